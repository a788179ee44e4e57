"""``python -m blockpredict ...``: the same as the ``blockpredict`` command."""

from .cli import command

command()
