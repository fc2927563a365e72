"""Entry point: ``python -m trainer.evaluate ckpt=PATH [key=value ...]``.

Loss, perplexity and the count of tokens evaluated of a checkpoint of any layout (or a Hugging Face
directory), on one process: by default on the run's own validation set, giving the ``val_loss`` the
trainer logged at that step; or on other text (``data=files 'data.paths=[...]'``), always tokenized with
the model's own tokenizer. One summary line; ``out=FILE`` also writes JSON. Bad input is one line on
stderr and exit code 2. Keys: ``conf/evaluate.yaml`` and README, "Using a trained model".
"""

from __future__ import annotations

import sys

from trainer.inference.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
