"""``python -m naflow_fx``: the ``naflow`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
