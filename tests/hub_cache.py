"""A Hugging Face hub cache laid out by huggingface_hub's own code, for tests that never go online.

`hf_hub_download` stores each file as ``blobs/<etag>`` (sha256 of the content for LFS files such as
safetensors, git's sha1 of it for the rest), links ``snapshots/<commit>/<name>`` to it with a relative
symlink (``_create_symlink``) and records the branch in ``refs/<branch>``
(``_cache_commit_hash_for_specific_revision``). We call those same functions, so the fake cannot drift
from the real thing, and `check_cache` asks huggingface_hub to find every file again the way
`hf_hub_download(..., local_files_only=True)` does.
"""

from __future__ import annotations

import os
import shutil

REVISION = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def cache_folder(hf_home) -> str:
    """Where huggingface_hub keeps repos under HF_HOME (HF_HUB_CACHE's default)."""
    return os.path.join(str(hf_home), "hub")


def etag(path: str) -> str:
    """The name huggingface_hub gives a file's blob: what the hub sends as its ETag."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    with open(path, "rb") as handle:
        if path.endswith(LFS_SUFFIXES):
            return sha_fileobj(handle).hex()
        return git_hash(handle.read())


def make_cache(hf_home, repo_id: str, model_folder, revision: str = REVISION, branch: str = "main") -> str:
    """Put the files of `model_folder` into the hub cache under `hf_home` as a download of `repo_id` at
    commit `revision` (the tip of `branch`) leaves them; returns the snapshot folder."""
    from huggingface_hub import file_download

    storage = os.path.join(cache_folder(hf_home), file_download.repo_folder_name(repo_id=repo_id, repo_type="model"))
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    for name in sorted(os.listdir(model_folder)):
        source = os.path.join(str(model_folder), name)
        if not os.path.isfile(source):
            continue
        blob = os.path.join(storage, "blobs", etag(source))
        new_blob = not os.path.exists(blob)
        if new_blob:
            shutil.copyfile(source, blob)
        pointer = file_download._get_pointer_path(storage, revision, name)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        file_download._create_symlink(blob, pointer, new_blob=new_blob)
    file_download._cache_commit_hash_for_specific_revision(storage, branch, revision)
    snapshot = os.path.join(storage, "snapshots", revision)
    check_cache(hf_home, repo_id, model_folder, revision, branch)
    return snapshot


def check_cache(hf_home, repo_id: str, model_folder, revision: str, branch: str) -> None:
    """huggingface_hub itself finds every file, by branch and by commit, as a relative link to its blob."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cache = cache_folder(hf_home)
    for name in os.listdir(model_folder):
        if not os.path.isfile(os.path.join(str(model_folder), name)):
            continue
        for rev in (branch, revision):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache, revision=rev)
            assert isinstance(found, str) and found.endswith(os.path.join("snapshots", revision, name)), found
        link = os.readlink(found)
        assert not os.path.isabs(link) and link.startswith(os.path.join("..", "..", "blobs")), link
    folder = snapshot_download(repo_id, cache_dir=cache, revision=branch, local_files_only=True)
    assert os.path.basename(folder) == revision
