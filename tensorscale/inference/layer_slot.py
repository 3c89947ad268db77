"""Run a model one decoder layer at a time, with only that layer's weights in memory.

Why: calibrating `down` needs what every layer sees on real text, but loading a whole model would make
memory grow with the model. A slot is the stock transformers model built from the config with a single
decoder layer; the weights of layer l are loaded into it, it runs on the hidden states the previous layer
produced, and the next layer's weights replace them. The inputs a layer takes besides the hidden states
(rotary position embeddings, the causal mask, position ids) differ between architectures, so they are not
computed here: they are caught, once, on their way into the first layer of a real forward pass (the
technique of SparseGPT's and Wanda's reference code), and handed to every layer after that.

Nothing here knows an architecture: the layer module is found from the name of a layer tensor.
"""

from __future__ import annotations

import torch

from ..errors import TensorscaleError
from .loading import require_transformers


class _Caught(Exception):
    pass


class LayerSlot:
    """A one-layer stock model for `config`; `layer_prefix` is how tensor names of layer 0 begin
    (e.g. 'model.layers.0.'), found by the caller from the rules."""

    @staticmethod
    def build_config(config: dict, command: str = "down --calibration"):
        """transformers' config for a one-layer model of `config`, or one line saying why it refuses it
        (e.g. Llama's check that the head count divides the hidden size). Cheap: callers check the sizes
        with it before any calibration work."""
        transformers = require_transformers(command)
        settings = dict(config)
        settings["num_hidden_layers"] = 1
        settings.pop("layer_types", None)  # per-layer attention kinds are re-derived for one layer
        settings["use_cache"] = False
        refusals = (KeyError, ValueError, TypeError)
        try:
            from huggingface_hub.errors import StrictDataclassError  # transformers 5's validated configs

            refusals = (*refusals, StrictDataclassError)
        except ImportError:
            pass
        try:
            return transformers.AutoConfig.for_model(
                settings.pop("model_type"),
                **{k: v for k, v in settings.items() if k not in ("architectures", "transformers_version")},
            )
        except refusals as exc:
            reason = " ".join(str(exc).split())
            raise TensorscaleError(f"transformers cannot build this architecture at these sizes: {reason}") from None

    def __init__(self, config: dict, layer_prefix: str, command: str = "down --calibration"):
        transformers = require_transformers(command)
        hf_config = self.build_config(config, command)
        if isinstance(config.get("layer_types"), list) and config["layer_types"]:
            hf_config.layer_types = config["layer_types"][:1]
        self.model = None
        for attention in ("sdpa", "eager"):  # sdpa is faster; some architectures (Gemma-2) have only eager
            hf_config._attn_implementation = attention
            torch.manual_seed(0)
            try:
                with torch.device("cpu"):
                    self.model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
                break
            except ValueError as exc:
                if attention == "eager" or "attention implementation" not in str(exc):
                    raise
        self.model.train(False)
        self.prefix = layer_prefix
        module_name = layer_prefix.rstrip(".")
        try:
            self.layer = self.model.get_submodule(module_name)
        except AttributeError:
            raise TensorscaleError(
                f"transformers' model has no module {module_name}; the rules' layer names "
                "do not match the stock architecture"
            ) from None
        self.keys = set(self.model.state_dict())
        self._renamings = _weight_renamings(self.model)

    def key(self, tensor_name: str) -> str | None:
        """The slot's name for a checkpoint tensor: the same, or as transformers renames it on loading (its
        conversion mapping: GPT-NeoX's embed_out is lm_head), or with the base model's prefix (GPT-2's hub
        checkpoints store h.0.* for transformer.h.0.*). None if the slot has no such tensor."""
        if tensor_name in self.keys:
            return tensor_name
        renamed = tensor_name
        for renaming in self._renamings:
            renamed, _ = renaming.rename_source_key(renamed)
        prefix = getattr(self.model, "base_model_prefix", "")
        for candidate in (renamed, f"{prefix}.{renamed}" if prefix else None):
            if candidate in self.keys:
                return candidate
        return None

    def has(self, tensor_name: str) -> bool:
        return self.key(tensor_name) is not None

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put weights into the slot, by their checkpoint names for layer 0 (layer tensors renamed to layer 0).
        Names the slot does not have are refused (the caller's renaming is wrong, not the model)."""
        keys = {name: self.key(name) for name in tensors}
        unknown = [name for name, key in keys.items() if key is None]
        if unknown:
            raise TensorscaleError(f"calibration: the stock model has no tensor {unknown[0]}")
        state = {keys[name]: t.float() for name, t in tensors.items()}
        self.model.load_state_dict(state, strict=False, assign=True)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()  # assign=True replaced the embedding; the tied head must follow it

    @torch.no_grad()
    def first_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The hidden states and keyword arguments the first layer gets for the batch `ids` [batch, seq]."""
        caught = {}

        def catch(module, args, kwargs):
            caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Caught

        handle = self.layer.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            self.model(input_ids=ids, use_cache=False)
        except _Caught:
            pass
        finally:
            handle.remove()
        if "hidden" not in caught:
            raise TensorscaleError("calibration: the model's forward never reached its first layer")
        kwargs = caught["kwargs"]
        kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs.pop("cache", None)
        return caught["hidden"], kwargs

    @torch.no_grad()
    def run(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.layer(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, last_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits for `ids` when its last layer outputs `last_hidden`: the model's own final
        norm, head and any soft-capping run on it (a forward hook replaces the one layer's output)."""
        handle = self.layer.register_forward_hook(
            lambda module, args, kwargs, out: (last_hidden, *out[1:]) if isinstance(out, tuple) else last_hidden,
            with_kwargs=True,
        )
        try:
            return self.model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()

    def module(self, tensor_name: str):
        """The module that owns a tensor of the slot (its name without '.weight'/'.bias')."""
        return self.model.get_submodule((self.key(tensor_name) or tensor_name).rsplit(".", 1)[0])


def _weight_renamings(model) -> list:
    """The key renamings transformers applies when it loads a checkpoint into `model` (only the plain
    renamings: a conversion that splits or merges tensors would not be one tensor per name). Empty where this
    transformers has no conversion mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return []
    try:
        mapping = get_model_conversion_mapping(model)
    except Exception:  # an internal API: without it, names are taken as they are
        return []
    return [t for t in mapping if type(t) is WeightRenaming]
