"""The LayerSkip toolkit's decoding as a Hugging Face `custom_generate` directory:

    model.generate(input_ids, attention_mask=..., custom_generate="path/to/hf_custom_generate",
                   trust_remote_code=True, max_new_tokens=64, exit_layer=8, num_speculations=6)

transformers copies this file into its modules cache (HF_MODULES_CACHE) and calls `generate` below instead of its
own, with the model and every argument of the call. It calls `generate` again with the toolkit's callable,
`self_speculation.hf.layerskip_generate` (whose docstring holds what is mapped and refused), handing it the
tokenizer under the name that callable takes (transformers drops `tokenizer=` on the way to a callable).

The toolkit must be importable: on sys.path (the process runs from the repository's root, or has it on
PYTHONPATH), or named by the environment variable LAYERSKIP_ROOT (the repository's root). Where this file lies is
no help: transformers runs a copy of it."""

import importlib
import os
import sys


def _layerskip_generate():
    """The toolkit's callable. The import is a call, not a statement: transformers checks a statement's module
    against the installed packages and would advise `pip install self_speculation`, which is not this toolkit."""
    root = os.environ.get("LAYERSKIP_ROOT")
    if root and root not in sys.path:
        sys.path.append(root)
    try:
        return importlib.import_module("self_speculation.hf").layerskip_generate
    except ModuleNotFoundError as error:
        if error.name != "self_speculation":
            raise
        where = f"LAYERSKIP_ROOT={root} does not hold it" if root else "set LAYERSKIP_ROOT to the repository's root"
        raise ImportError(f"the LayerSkip toolkit (package self_speculation) is not importable: {where}, or run "
                          "from the repository's root or with it on PYTHONPATH") from None


def generate(model, tokenizer=None, **arguments):
    if tokenizer is not None:
        arguments["stop_strings_tokenizer"] = tokenizer
    # the class's generate: a model loaded with this directory as its own custom_generate has this function as its
    # instance's generate
    return type(model).generate(model, custom_generate=_layerskip_generate(), **arguments)
