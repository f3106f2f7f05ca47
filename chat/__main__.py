"""`python -m chat`: talk to the fine-tuned model (see chat/cli.py)."""
import sys

from chat.cli import main

sys.exit(main())
