"""``accelerate launch -m rl.train configs/<recipe>.yaml [key=value ...]``: the training entry point
(the loop lives in ``rl.trainer.loop``)."""

import sys

from rl.trainer.loop import main

if __name__ == "__main__":
    sys.exit(main())
