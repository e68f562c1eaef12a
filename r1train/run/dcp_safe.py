"""Reading `torch.distributed.checkpoint` folders without running code that a folder brings along.

torch 2.13's DCP trusts its files: `FileSystemReader.read_metadata` reads `.metadata` with plain
`pickle.load`, and `DefaultLoadPlanner.load_bytes` reads every non-tensor item (the optimizer's
param groups) with `torch.load(weights_only=False)`. A checkpoint folder that someone else wrote
(a shared or downloaded run) could therefore run any code on resume. Here:

- `read_metadata` unpickles with `MetadataUnpickler`, which resolves only DCP's own metadata
  classes, torch dtypes / layouts / `Size`, and `pathlib` paths (DCP records the folder it wrote
  to). Any other global (`os.system`, `builtins.eval`, ...) stops the load with UnpicklingError
  naming it;
- `SafeLoadPlanner.load_bytes` reads the non-tensor items with `torch.load(weights_only=True)`;
- tensors were already read with `weights_only=True` by DCP itself.

Pass both to `dcp.load` (`safe_load`). If a torch upgrade writes a metadata type missing from the
allow-list, resume refuses with that type's name: add it to `ALLOWED` after checking it is data.
"""
from __future__ import annotations

import io
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

# module -> names that may appear as globals in a DCP `.metadata` pickle. All are plain data
# holders or constructors of values (dataclasses, an Enum, torch.Size, a layout looked up by name).
ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP metadata and refuses every other global."""

    def find_class(self, module: str, name: str):
        # Exact names only: pickle resolves dotted names attribute by attribute, which would
        # reach far beyond a listed class (e.g. "Metadata.__init__.__globals__").
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not a checkpoint metadata type; "
                                     f"refusing to unpickle it")


def read_metadata(path: str | os.PathLike):
    """The DCP `Metadata` of checkpoint folder `path`, through `MetadataUnpickler`."""
    with open(Path(path) / ".metadata", "rb") as f:
        return MetadataUnpickler(f).load()


class SafeFileSystemReader(dcp.FileSystemReader):
    """`FileSystemReader` whose metadata goes through `MetadataUnpickler` (torch 2.13's reads it
    with `pickle.load`)."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:  # as torch's reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that reads non-tensor items with `weights_only=True`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_load(state_dict: dict, path: str | os.PathLike) -> None:
    """`dcp.load(state_dict, checkpoint_id=path)`, in place, reading nothing that can run code."""
    with one_process_quiet():
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(),
                 no_dist=not torch.distributed.is_initialized())


@contextmanager
def one_process_quiet():
    """Without a process group DCP reads and writes in one process, as asked with `no_dist`, but
    torch 2.13 warns that it "assumes" so on every call: that warning is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
