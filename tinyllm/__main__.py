"""`python -m tinyllm ...` runs the same command line as `tinyllm ...`."""
from tinyllm.cli import main

if __name__ == "__main__":
    main()
