"""The float32 reference model that the onnx and tensorrt backends export their graphs from.

An onnxruntime session or a TensorRT engine holds its own copy of the weights, so once one exists
the reference's copy is released and the heap it leaves is handed back to the OS (with stop 22's
other memory changes, wav2vec2-base on the CPU went from 1.41 to 0.95 GB resident). When a graph
not in the cache must be exported later, the weights are built again from the checkpoint and must
hash to the same digest. A model that names no checkpoint is kept; one recalled from its
checkpoint's record (checkpoint_record.py) starts released.
"""
from __future__ import annotations

from torch import nn

from audioenc.checkpoint_record import forget, recorded_weights_digest, weights_digest
from audioenc.cpu import return_freed_memory
from audioenc.export import ExportSpec, cached_export, cached_graph, target_lang_of


class ReferenceWeights:
    def __init__(self, model: nn.Module):
        # a model recalled from its checkpoint's record comes without its weights (checkpoint_record.py)
        self.model = model if next(model.parameters()).is_meta else model.float().cpu().eval()
        self.source = getattr(model, "checkpoint_source", None)  # set by audioenc.load
        self.digest = recorded_weights_digest(self.model)

    @property
    def released(self) -> bool:
        return next(self.model.parameters()).is_meta

    def graph_path(self, spec: ExportSpec, rebuild_reason: str | None = None) -> str:
        """The cached ONNX graph for ``spec``, exported first when missing, stale or corrupt
        (``rebuild_reason``: the caller found it unusable)."""
        path = None if rebuild_reason else cached_graph(self.model, spec, self.digest)
        return path or cached_export(self.loaded(), spec, self.digest, rebuild_reason)

    def loaded(self) -> nn.Module:
        """The model with its weights, built again from the checkpoint if they were released."""
        if not self.released:
            return self.model
        from audioenc.loading import read_checkpoint, reference_model

        why = (f"a graph that is not in the cache must be exported from the reference weights, which audioenc "
               f"released to save memory; building them again from {self.source} failed:")
        try:
            checkpoint = read_checkpoint(self.source, self.model.dims.family,
                                         target_lang=target_lang_of(self.model) or None)
            model = reference_model(checkpoint, self.source)
        except (OSError, ValueError, RuntimeError) as exc:
            raise RuntimeError(f"{why} it cannot be read now ({exc}); load the encoder again") from exc
        if weights_digest(model) != self.digest:
            forget(getattr(self.model, "checkpoint", None))  # a record that no longer holds: the next load reads afresh
            raise RuntimeError(f"{why} its weights changed since the encoder was loaded; load the encoder again")
        self.model = model
        return model

    def release(self) -> None:
        """Frees the weights, when they can be built again; the model stays as a shell for its dims."""
        if self.source is not None and not self.released:
            self.model.to("meta")
            return_freed_memory()
