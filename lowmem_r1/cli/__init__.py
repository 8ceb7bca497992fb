"""The `lowmem-r1` command line (`lowmem_r1.cli:main`): parse, call one library function, print."""

from lowmem_r1.cli.app import app, main  # noqa: F401
