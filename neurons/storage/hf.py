"""Storage kind `hf`: a Hugging Face Hub model repo, pinned at the commit sha the upload created."""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from pathlib import Path

import yarl

from ..commitment import Commitment, encode_commitment
from ..manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, ManifestEntry, name_problem
from .core import Budget, FetchLimits, Hops, Net, Pace, Sink, client_session, reject

# Files every Hub repo may carry that are not part of the checkpoint; listed, never downloaded.
HUB_BOILERPLATE = frozenset({".gitattributes", "README.md"})


def hub_endpoint(endpoint: str | None) -> str | None:
    # huggingface_hub reads HF_ENDPOINT once, at import; reading it per call lets it change later.
    return endpoint or os.environ.get("HF_ENDPOINT") or None

# ================================================================================== publish
def stage(directory: Path, manifest: Manifest, *, hotkey: str, repo_id=None, hf_token=None, hf_endpoint=None,
          **_other_kinds) -> Commitment:
    if repo_id is None:
        raise ValueError("publishing 'hf' needs repo_id")
    encode_commitment(Commitment.for_model("hf", repo_id, "0" * 40, manifest.model_hash, hotkey))  # id fits
    sha = _stage_hf(directory, manifest, repo_id, hf_token, hf_endpoint)
    return Commitment.for_model("hf", repo_id, sha, manifest.model_hash, hotkey)


def release(commitment: Commitment, directory: Path, *, hf_token=None, hf_endpoint=None, **_other_kinds) -> None:
    from huggingface_hub import HfApi

    HfApi(endpoint=hub_endpoint(hf_endpoint), token=hf_token).update_repo_settings(commitment.location, private=False)


def _stage_hf(directory: Path, manifest: Manifest, repo_id: str, token: str | None, endpoint: str | None) -> str:
    """Upload exactly the manifest's files in one commit to the repo, made private first; the
    commit's sha pins the revision. While private, a validator that has not fetched the repo's
    previous checkpoint cannot; the commitment landing next replaces that one anyway."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
    api.create_repo(repo_id, exist_ok=True, private=True)  # a new repo is private from the start
    api.update_repo_settings(repo_id, private=True)        # an existing one may not be
    keep = {*manifest.names, MANIFEST_NAME}
    current = api.model_info(repo_id, revision="main").siblings or []
    # Files left from an earlier checkpoint would be in the new revision too, and a validator
    # refuses a revision holding files its manifest does not list.
    stale = [s.rfilename for s in current if s.rfilename not in keep and s.rfilename not in HUB_BOILERPLATE]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name)) for name in sorted(keep)]
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
    info = api.create_commit(repo_id, operations, commit_message="checkpoint")
    return info.oid


# ================================================================================== fetch
class HfSource:
    """A Hub model repo at a pinned commit: metadata through huggingface_hub, bytes streamed here."""

    def __init__(self, net: Net, commitment: Commitment, endpoint: str | None, token: str | None):
        from huggingface_hub import HfApi

        self.net, self.commitment, self.limits = net, commitment, net.limits
        self.api = HfApi(endpoint=hub_endpoint(endpoint), token=token)
        self.headers = {"Accept-Encoding": "identity"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"  # `_open` drops it on a redirect elsewhere
        self.sizes: dict[str, int | None] = {}
        self.lfs_sha: dict[str, str] = {}

    async def load_listing(self) -> None:
        repo, sha = self.commitment.location, self.commitment.revision
        try:
            async with asyncio.timeout(self.limits.request_timeout):
                info = await asyncio.to_thread(self.api.model_info, repo, revision=sha, files_metadata=True,
                                               timeout=self.limits.request_timeout)
        except TimeoutError:
            raise reject(f"hf repo {repo}: metadata not received within {self.limits.request_timeout:g}s") from None
        except Exception as e:  # not found, gated, network: whatever the Hub client raises
            # the type and status only: the Hub client's messages quote the server's response
            status = getattr(getattr(e, "response", None), "status_code", None)
            raise reject(f"hf repo {repo} at {sha[:12]}: metadata request failed: {type(e).__name__}"
                          + (f" (HTTP {status})" if isinstance(status, int) else "")) from None
        if info.sha != sha:
            raise reject(f"hf repo {repo}: the Hub resolved revision {sha[:12]} to {str(info.sha)[:12]}")
        for sibling in info.siblings or []:
            name = sibling.rfilename
            if name in HUB_BOILERPLATE:
                continue
            problem = name_problem(name)
            if problem:
                raise reject(f"hf repo {repo}: {problem}", "manifest")
            self.sizes[name] = sibling.size
            if sibling.lfs is not None:
                self.lfs_sha[name] = sibling.lfs.sha256

    def _url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.commitment.location, name, revision=self.commitment.revision, endpoint=self.api.endpoint)

    async def manifest(self, budget: Budget) -> bytes:
        if MANIFEST_NAME not in self.sizes:
            raise reject(f"hf repo {self.commitment.location} has no manifest.json at this revision", "manifest")
        sink = Sink("manifest.json", MAX_MANIFEST_BYTES, budget)
        await self.net.get(self._url(MANIFEST_NAME), self.headers, sink)
        return sink.content()

    def check_listing(self, manifest: Manifest) -> None:
        """The revision holds exactly the manifest's files; sizes and LFS hashes agree up front."""
        for name in self.sizes:
            if name != MANIFEST_NAME and manifest.entry(name) is None:
                raise reject(f"hf repo file {name!r} is not listed in the manifest", "manifest")
        for entry in manifest.files:
            if entry.name not in self.sizes:
                raise reject(f"file {entry.name!r} listed in the manifest is missing from the hf repo", "manifest")
            size = self.sizes[entry.name]
            if size is not None and size != entry.size:
                raise reject(f"hf repo file {entry.name!r} is {size} bytes, the manifest says {entry.size}",
                              "manifest")
            lfs = self.lfs_sha.get(entry.name)
            if lfs is not None and lfs != entry.sha256:
                raise reject(f"hf repo file {entry.name!r} sha256 mismatch: manifest {entry.sha256[:16]}..., "
                              f"hub {str(lfs)[:16]}...", "manifest")

    async def download(self, entry: ManifestEntry, sink: Sink) -> None:
        await self.net.get(self._url(entry.name), self.headers, sink)


@asynccontextmanager
async def open_source(commitment: Commitment, limits: FetchLimits, *, localnet: bool, hf_endpoint=None,
                      hf_token=None, **_other_kinds):
    async with client_session(limits, localnet) as session:
        pace = Pace(limits)
        endpoint = yarl.URL(hub_endpoint(hf_endpoint) or "https://huggingface.co")
        net = Net(session, limits, pace, Hops(endpoint, localnet, follow=True))
        source = HfSource(net, commitment, hf_endpoint, hf_token)
        await source.load_listing()
        yield source
