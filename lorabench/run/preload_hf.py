"""What the fork server imports for cells that use transformers or PEFT, without querying CUDA.

    lorabench run --models bert-tiny --methods lora --ranks 8     # its cells fork from a server that imported this

Importing this module is its whole job (`multiprocessing`'s preload takes module names): transformers'
BERT and peft (about 4 s on 2 cores), with bitsandbytes kept out (`forksafe`): it queries CUDA on
import, and every cell forked from this server must be free to use CUDA.
"""

from ..forksafe import keep_out

keep_out()
import peft  # noqa: E402,F401
import transformers.models.bert.modeling_bert  # noqa: E402,F401  (the built-in BERT models' code)
