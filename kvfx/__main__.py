"""`python -m kvfx ...`: the kvfx command (kvfx/cli)."""
from .cli import main

raise SystemExit(main())
