"""``python -m cmcl`` is the same as the ``cmcl`` command."""

from cmcl.cli import main

if __name__ == "__main__":
    main()
