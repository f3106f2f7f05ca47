"""`python -m chat.serve`: the OpenAI-compatible server (see chat/serve/cli.py)."""
import sys

from chat.serve.cli import main

sys.exit(main())
