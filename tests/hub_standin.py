"""A local HTTP stand-in for the Hugging Face hub, for tests of the real huggingface_hub client.

The hub cannot be reached from CI, and mocking ``HfApi`` would test nothing of the upload
path. This threaded server implements the endpoints ``HfApi.create_repo``,
``HfApi.repo_info`` and ``HfApi.create_commit`` call (read from huggingface_hub 2.4):

- ``POST /api/repos/create``                      create a repo (409 when it exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``    repo info: head sha, files
- ``POST /api/validate-yaml``                     README metadata check
- ``POST /api/models/{repo}/preupload/{rev}``     upload mode per file + the remote oid (no-op detection)
- ``POST /{repo}.git/info/lfs/objects/batch``     LFS basic transfer: where to PUT each blob
- ``PUT  /lfs-upload/{oid}``                      the blob
- ``POST /api/models/{repo}/commit/{rev}``        ndjson commit: regular files inline, LFS files by oid
- ``GET  /api/models/{repo}/tree/{rev}``          file listing (``snapshot_download``)
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``       file metadata / content (``hf_hub_download``);
  every content GET is recorded in ``server.downloads``

Auth follows the hub: a Bearer token must be known (else 401) and allowed to write the
namespace (else 403). ``fail_next(method, path_contains, status, times)`` injects
transient errors. Repos and commits live in memory on ``server.repos``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)  # paths stored as LFS
    commits: list[dict] = field(default_factory=list)  # newest last: {"oid", "title", "files"}

    @property
    def sha(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40

    def oid(self, path: str) -> str | None:
        if path not in self.files:
            return None
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_sha1(data)


class HubStandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokens: dict[str, tuple[str, list[str]]]):
        """``tokens``: token -> (user name, namespaces it may write)."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, authorization header)
        self.downloads: list[str] = []  # "repo/path" of every file content served
        self._faults: list[list] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "HubStandIn":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def seed(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """A repo with one commit holding ``files``, as if a user had pushed them."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private))
        for path, data in files.items():
            repo.files[path] = data
            if path.endswith(LFS_SUFFIXES):
                repo.lfs.add(path)
        oid = hashlib.sha1(f"{repo_id}{sorted(files)}{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "title": "seed", "files": sorted(files)})
        return repo

    def fail_next(self, method: str, path_contains: str, status: int = 503, times: int = 1) -> None:
        self._faults.append([method, path_contains, status, times])

    def fault_for(self, method: str, path: str) -> int | None:
        with self._lock:
            for f in self._faults:
                if f[0] == method and f[1] in path and f[3] > 0:
                    f[3] -= 1
                    return f[2]
        return None


class _Handler(BaseHTTPRequestHandler):
    server: HubStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, payload: dict | None = None, headers: dict | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code} if code else None)

    def _user(self) -> tuple[str, list[str]] | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        return self.server.tokens.get(token)

    def _authorize(self, repo_id: str) -> bool:
        """401 for a missing or unknown token, 403 when the token may not write this namespace."""
        user = self._user()
        if user is None:
            self._error(401, "Invalid username or password.")
            return False
        if repo_id.split("/")[0] not in user[1]:
            self._error(403, f"You don't have the rights to create a model under the namespace \"{repo_id.split('/')[0]}\"")
            return False
        return True

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append((method, path, self.headers.get("Authorization", "")))
        body = self._body()
        fault = self.server.fault_for(method, path)
        if fault:
            return self._error(fault, "Service temporarily unavailable (injected)")
        for pattern, handler in ROUTES.get(method, []):
            m = re.fullmatch(pattern, path)
            if m:
                return handler(self, body, *m.groups())
        self._error(404, f"stand-in: no route for {method} {path}")

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    def do_HEAD(self):  # noqa: N802
        self._dispatch("HEAD")

    # --- endpoints ------------------------------------------------------------------------
    def create_repo(self, body: bytes) -> None:
        req = json.loads(body)
        repo_id = f"{req.get('organization')}/{req['name']}"
        if not self._authorize(repo_id):
            return
        url = f"{self.server.url}/{repo_id}"
        if repo_id in self.server.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self.server.repos[repo_id] = Repo(repo_id, private=req.get("visibility") == "private" or bool(req.get("private")))
        self._send(200, {"url": url, "name": repo_id})

    def repo_info(self, body: bytes, repo_id: str, revision: str | None = None) -> None:
        repo = self.server.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or repo_id.split("/")[0] not in user[1])):
            return self._error(404, "Repository not found", "RepoNotFound")
        self._send(200, {
            "id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
        })

    def _readable_repo(self, repo_id: str) -> Repo | None:
        repo = self.server.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or repo_id.split("/")[0] not in user[1])):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def tree(self, body: bytes, repo_id: str, revision: str, _sub: str | None = None) -> None:
        repo = self._readable_repo(repo_id)
        if repo is None:
            return
        entries = []
        for path in sorted(repo.files):
            data = repo.files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in repo.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)  # type: ignore[arg-type]

    def resolve(self, body: bytes, repo_id: str, revision: str, path: str) -> None:
        repo = self._readable_repo(repo_id)
        if repo is None:
            return
        if path not in repo.files:
            return self._error(404, f"{path} not found", "EntryNotFound")
        data = repo.files[path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{repo.oid(path)}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.end_headers()
        if self.command == "GET":
            with self.server._lock:
                self.server.downloads.append(f"{repo_id}/{path}")
            self.wfile.write(data)

    def validate_yaml(self, body: bytes) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def _repo_for_write(self, repo_id: str) -> Repo | None:
        if not self._authorize(repo_id):
            return None
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def preupload(self, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo_for_write(repo_id)
        if repo is None:
            return
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": repo.oid(f["path"])})
        self._send(200, {"files": files})

    def lfs_batch(self, body: bytes, repo_id: str) -> None:
        if self._repo_for_write(repo_id) is None:
            return
        objects = []
        for o in json.loads(body)["objects"]:
            entry = {"oid": o["oid"], "size": o["size"]}
            if o["oid"] not in self.server.blobs:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs-upload/{o['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_upload(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "sha256 mismatch")
        self.server.blobs[oid] = body
        self._send(200, {})

    def commit(self, body: bytes, repo_id: str, revision: str) -> None:
        repo = self._repo_for_write(repo_id)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        changed = []
        for item in lines:
            v = item["value"]
            if item["key"] == "file":
                repo.files[v["path"]] = base64.b64decode(v["content"])
                repo.lfs.discard(v["path"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.server.blobs:
                    return self._error(422, f"LFS object {v['oid']} was not uploaded")
                repo.files[v["path"]] = self.server.blobs[v["oid"]]
                repo.lfs.add(v["path"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                for p in [p for p in repo.files if p == v["path"] or p.startswith(v["path"].rstrip("/") + "/")]:
                    del repo.files[p]
            else:
                continue
            changed.append(v["path"])
        oid = hashlib.sha1(f"{repo.sha}{header['summary']}{sorted(changed)}{len(repo.commits)}".encode()).hexdigest()
        repo.commits.append({"oid": oid, "title": header["summary"], "files": changed})
        self._send(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True})


_REPO = r"([^/]+/[^/]+?)"
ROUTES = {
    "GET": [
        (rf"/api/models/{_REPO}/tree/([^/]+)(/.*)?", _Handler.tree),
        (rf"/{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
        (rf"/api/models/{_REPO}/revision/([^/]+)", _Handler.repo_info),
        (rf"/api/models/{_REPO}", _Handler.repo_info),
    ],
    "POST": [
        (r"/api/repos/create", _Handler.create_repo),
        (r"/api/validate-yaml", _Handler.validate_yaml),
        (rf"/api/models/{_REPO}/preupload/([^/]+)", _Handler.preupload),
        (rf"/api/models/{_REPO}/commit/([^/]+)", _Handler.commit),
        (rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ],
    "PUT": [(r"/lfs-upload/([0-9a-f]{64})", _Handler.lfs_upload)],
    "HEAD": [(rf"/{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve)],
}
