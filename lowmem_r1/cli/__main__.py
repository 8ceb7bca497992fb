"""`python -m lowmem_r1.cli ...`."""

from lowmem_r1.cli.app import main

if __name__ == "__main__":
    main()
