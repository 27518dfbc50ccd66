"""``python -m zoo.cli ARGS``: the ``zoo`` console script."""

from zoo.cli import main

if __name__ == "__main__":
    main()
