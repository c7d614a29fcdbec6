"""`python -m pipeline <command> [--options]`: see pipeline/cli.py."""

import sys

from pipeline.cli import command_line

sys.exit(command_line())
