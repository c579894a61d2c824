"""``python -m bnfx.ops.triton aot``: compile every kernel variant for sm_80 and sm_90 (see ``aot``)."""

import sys

USAGE = "usage: python -m bnfx.ops.triton aot [--target CAPABILITY ...] [--jobs N] [--json PATH]"

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "aot":
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    from bnfx.ops.triton import aot

    sys.exit(aot.main(sys.argv[2:]))
