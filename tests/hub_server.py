"""A small Hub-compatible HTTP server for the tests: test infrastructure, not product.

It implements the part of huggingface.co's HTTP API that the real `huggingface_hub` client (1.x and 2.x),
transformers and `datasets` (5.x: `load_dataset`, plain and streaming, through `HfFileSystem`) use to create a model
or dataset repo, push commits, make branches, list files and download them. {type}s is `models` or `datasets`:

    GET  /api/whoami-v2                                   who owns the token (401 for a bad one)
    POST /api/repos/create                                `type` model or dataset; 409 if it exists, 403 outside the
                                                          token's namespaces
    POST /api/validate-yaml                               checks a model card's metadata like the Hub does
    GET  /api/{type}s/{repo}[/revision/{rev}]             repo info with `sha` and `siblings` (`?blobs=true`: with
                                                          `size` and `blobId`); datasets also with the README's `cardData`
    POST /api/{type}s/{repo}/preupload/{rev}              always `uploadMode: regular`, so no LFS or Xet path
    POST /api/{type}s/{repo}/commit/{rev}                 NDJSON: header, then files as base64 or deletions
    POST /api/{type}s/{repo}/branch/{branch}              a branch from `startingPoint` (default main)
    GET  /api/{type}s/{repo}/refs | commits/{rev}
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]          files and directories under path; `recursive`, `expand`
                                                          (adds `lastCommit`), pages of 1000 (50 expanded) with a
                                                          `Link: <...&cursor=N>; rel="next"` header
    POST /api/{type}s/{repo}/paths-info/{rev}             form or JSON `paths` (+ `expand`): the entries that exist
    GET|HEAD /{repo}/resolve/{rev}/{path}                 a model's file, with ETag, X-Repo-Commit and Range support
    GET|HEAD /datasets/{repo}/resolve/{rev}/{path}        the same for a dataset

Anything else (spaces, `/api/datasets/{repo}/parquet`, the dataset viewer) is a plain 404, which the clients take
as "not available". Errors carry the headers the client turns into typed exceptions: `X-Error-Code: RepoNotFound |
RevisionNotFound | EntryNotFound` on 404 (a missing dataset makes `load_dataset` raise `DatasetNotFoundError` at
once), and `X-Error-Message` on 401/403. State is in memory; each commit stores its full file set, which is fine
for the kilobyte-sized repos of the tests. `hub.repos` is keyed by repo id for models and "datasets/{repo id}" for
datasets (`repo_key`); `push_dataset(hub, repo_id, files)` seeds a dataset repo without a client.

Start one with `running_hub()` and point a client at it with the environment of `hub_env(server)`: HF_ENDPOINT
and HF_TOKEN must be set before `huggingface_hub` (or `datasets`) is imported, so clients run in subprocesses; a
`datasets` client also needs HF_DATASETS_OFFLINE=0 and, to start cold, its own HF_HOME.
"""

import base64
import hashlib
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

WRITE_TOKEN = "hf_test_alice_write_0123456789"  # alice may write to alice/* and minigpt-org/*
OTHER_TOKEN = "hf_test_bob_write_9876543210"  # bob may write to bob/* only
USERS = {WRITE_TOKEN: ("alice", ["minigpt-org"]), OTHER_TOKEN: ("bob", [])}
REPO_TYPES = {"models": "model", "datasets": "dataset"}  # the URL segment of /api/{type}s/... -> repo type


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """The key of `HubServer.repos`: the repo id for a model, "datasets/{repo id}" for a dataset (as in Hub URLs)."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def git_blob_oid(data: bytes) -> str:
    """The oid git (and the Hub) give a regular file: sha1 of 'blob <size>\\0' + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    author: str
    date: str
    files: dict[str, bytes]
    parent: str | None = None


@dataclass
class Repo:
    repo_id: str
    private: bool
    repo_type: str = "model"
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    @property
    def url_path(self) -> str:  # where the Hub shows it: /alice/x for a model, /datasets/alice/x for a dataset
        return "/" + repo_key(self.repo_id, self.repo_type)

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        out, commit = [], self.resolve(revision)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """In-memory Hub. `users` maps a token to (user name, [organisations it may write to])."""

    def __init__(self, users: dict[str, tuple[str, list[str]]] | None = None):
        self.users = dict(USERS if users is None else users)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for assertions and debugging
        self.lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- direct access for tests (seeding a repo someone else owns, reading what was pushed) ------------------
    def create_repo(
        self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None, repo_type: str = "model"
    ) -> Repo:
        with self.lock:
            repo = self.repos[repo_key(repo_id, repo_type)] = Repo(repo_id, private, repo_type)
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            self._commit(repo, "main", "initial commit", "", repo_id.split("/")[0], {**initial, **(files or {})}, [])
            return repo

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        return dict(self.repos[repo_key(repo_id, repo_type)].resolve(revision).files)

    # -- the model ---------------------------------------------------------------------------------------------
    def _commit(self, repo, branch, title, message, author, added, deleted) -> Commit:
        parent = repo.resolve(branch) if branch in repo.branches else None
        files = dict(parent.files) if parent else {}
        for path in deleted:
            files = {p: d for p, d in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
        files.update(added)
        self._counter += 1
        oid = hashlib.sha1(f"{repo.repo_id}\0{branch}\0{self._counter}\0{title}".encode()).hexdigest()
        commit = Commit(oid, title, message, author, _now(), files, parent.oid if parent else None)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _user(self, headers, required: bool) -> tuple[str, list[str]] | None:
        auth = headers.get("authorization") or ""
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
        if token is None:
            if required:
                raise HubError(401, "You must be authenticated to do this; pass a token.")
            return None
        if token not in self.users:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.users[token]

    def _readable(self, repo_id: str, user, repo_type: str = "model") -> Repo:
        repo = self.repos.get(repo_key(repo_id, repo_type))
        if repo is None or (repo.private and (user is None or repo_id.split("/")[0] not in _namespaces(user))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_id: str, headers, repo_type: str = "model") -> tuple[Repo, tuple[str, list[str]]]:
        user = self._user(headers, required=True)
        repo = self._readable(repo_id, user, repo_type)
        if repo_id.split("/")[0] not in _namespaces(user):
            raise HubError(403, f"You don't have the rights to write to {repo_id} as {user[0]}")
        return repo, user

    @staticmethod
    def _revision(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- routes ------------------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, headers, body: bytes):
        """Return (status, headers, body bytes or JSON-able object)."""
        if path == "/api/whoami-v2" and method == "GET":
            name, orgs = self._user(headers, required=True)
            return (
                200,
                {},
                {
                    "type": "user",
                    "id": hashlib.md5(name.encode()).hexdigest()[:24],
                    "name": name,
                    "fullname": name.title(),
                    "orgs": [{"type": "org", "name": org} for org in orgs],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
                },
            )
        if path == "/api/repos/create" and method == "POST":
            return self._create(headers, json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            errors = validate_card_metadata(json.loads(body)["content"])
            return (400 if errors else 200), {}, {"errors": [{"message": e} for e in errors], "warnings": []}

        m = re.fullmatch(
            r"/api/(models|datasets)/([^/]+/[^/]+)"
            r"(?:/(revision|preupload|commit|branch|tree|commits|paths-info)/(.+)|/(refs))?",
            path,
        )
        if m:
            type_segment, repo_id, action, rest, refs = m.groups()
            repo_type = REPO_TYPES[type_segment]
            rev, _, sub = (rest or "").partition("/")
            rev = unquote(rev)
            if refs:
                repo = self._readable(repo_id, self._user(headers, required=False), repo_type)
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.branches.items()]
                return 200, {}, {"branches": branches, "converts": [], "tags": []}
            if action in (None, "revision") and method == "GET":
                repo = self._readable(repo_id, self._user(headers, required=False), repo_type)
                commit = self._revision(repo, unquote(rest) if action else "main")
                blobs = _flag(query, "blobs")
                info = {
                    "id": repo_id,
                    "author": repo_id.split("/")[0],
                    "sha": commit.oid,
                    "private": repo.private,
                    "disabled": False,
                    "gated": False,
                    "lastModified": commit.date,
                    "tags": [],
                    "siblings": [
                        {"rfilename": p, **({"size": len(d), "blobId": git_blob_oid(d)} if blobs else {})}
                        for p, d in sorted(commit.files.items())
                    ],
                }
                if repo_type == "model":
                    info["modelId"] = repo_id
                else:
                    info["cardData"] = _front_matter(commit.files.get("README.md", b"").decode(errors="replace"))
                return 200, {}, info
            if action == "tree" and method == "GET":
                repo = self._readable(repo_id, self._user(headers, required=False), repo_type)
                commit = self._revision(repo, rev)
                expand = _flag(query, "expand")
                entries = self._tree(repo, commit, unquote(sub).strip("/"), _flag(query, "recursive"), expand)
                limit, start = (50 if expand else 1000), int((query.get("cursor") or ["0"])[0])
                extra = {}
                if start + limit < len(entries):
                    params = {k: v[0] for k, v in query.items() if k != "cursor"} | {"cursor": start + limit}
                    extra["Link"] = f'<{self.url}{path}?{urlencode(params)}>; rel="next"'
                return 200, extra, entries[start : start + limit]
            if action == "paths-info" and method == "POST":
                repo = self._readable(repo_id, self._user(headers, required=False), repo_type)
                commit = self._revision(repo, rev)
                if (headers.get("content-type") or "").startswith("application/json"):
                    form = {k: v if isinstance(v, list) else [v] for k, v in json.loads(body).items()}
                else:
                    form = parse_qs(body.decode())
                entries = []
                for p in (p.strip("/") for p in form.get("paths", [])):
                    if p in commit.files or any(f.startswith(p + "/") for f in commit.files):  # else left out
                        parent = self._tree(repo, commit, p.rpartition("/")[0], False, _flag(form, "expand"))
                        entries += [e for e in parent if e["path"] == p]
                return 200, {}, entries
            if action == "commits" and method == "GET":
                repo = self._readable(repo_id, self._user(headers, required=False), repo_type)
                self._revision(repo, rev)
                return (
                    200,
                    {},
                    [
                        {
                            "id": c.oid,
                            "title": c.title,
                            "message": c.message,
                            "date": c.date,
                            "authors": [{"user": c.author}],
                        }
                        for c in repo.history(rev)
                    ],
                )
            if action == "preupload" and method == "POST":
                repo, _ = self._writable(repo_id, headers, repo_type)
                commit = self._revision(repo, rev)
                files = []
                for f in json.loads(body)["files"]:
                    existing = commit.files.get(f["path"])
                    oid = git_blob_oid(existing) if existing is not None else None
                    files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
                return 200, {}, {"files": files, "commitOid": commit.oid}
            if action == "commit" and method == "POST":
                return self._commit_route(repo_id, repo_type, rev, query, headers, body)
            if action == "branch" and method == "POST":
                repo, _ = self._writable(repo_id, headers, repo_type)
                if rev in repo.branches:
                    raise HubError(409, f"Reference {rev} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                repo.branches[rev] = self._revision(repo, start).oid
                return 200, {}, {}

        m = re.fullmatch(r"/(?:(datasets)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m and method in ("GET", "HEAD"):
            repo_type = "dataset" if m.group(1) else "model"
            repo_id, rev, filename = m.group(2), unquote(m.group(3)), unquote(m.group(4))
            if repo_id.split("/")[0] in ("api", "datasets", "spaces"):
                raise HubError(404, "Repository not found", "RepoNotFound")
            commit = self._revision(self._readable(repo_id, self._user(headers, required=False), repo_type), rev)
            if filename not in commit.files:
                raise HubError(404, f"Entry not found: {filename}", "EntryNotFound")
            data = commit.files[filename]
            out = {
                "ETag": f'"{git_blob_oid(data)}"',
                "X-Repo-Commit": commit.oid,
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            status = 200
            rng = re.fullmatch(r"bytes=(\d*)-(\d*)", headers.get("range") or "")
            if rng and rng.group(1) + rng.group(2):  # bytes=a-b, bytes=a- or the last n bytes: bytes=-n
                size = len(data)
                if rng.group(1):
                    start, end = int(rng.group(1)), min(int(rng.group(2) or size - 1), size - 1)
                else:
                    start, end = max(size - int(rng.group(2)), 0), size - 1
                if start >= size or start > end:
                    return 416, {**out, "Content-Range": f"bytes */{size}"}, b""
                out["Content-Range"] = f"bytes {start}-{end}/{size}"
                data, status = data[start : end + 1], 206
            return status, out, data
        raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {path}")

    def _create(self, headers, payload: dict):
        user = self._user(headers, required=True)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES.values():
            raise HubError(400, "This test server hosts model and dataset repos only.")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        if namespace not in _namespaces(user):
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        key = repo_key(repo_id, repo_type)
        url = f"{self.url}/{key}"
        with self.lock:
            if key in self.repos:
                message = f"You already created this {repo_type} repo"
                return 409, {"X-Error-Message": message}, {"error": message, "url": url}
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.create_repo(repo_id, private=private, repo_type=repo_type)
        return 200, {}, {"url": url, "name": repo_id, "id": hashlib.md5(key.encode()).hexdigest()}

    def _tree(self, repo: Repo, commit: Commit, prefix: str, recursive: bool, expand: bool) -> list[dict]:
        """The tree endpoint's entries under `prefix` ("" for the root): its files and directories, or all of them
        below it when `recursive`; with `expand`, each with the `lastCommit` that last changed it."""
        if prefix and not any(p.startswith(prefix + "/") for p in commit.files):
            raise HubError(404, f"{prefix} does not exist on this revision", "EntryNotFound")
        entries = {}
        for path, data in commit.files.items():
            if prefix and not path.startswith(prefix + "/"):
                continue
            parts = path[len(prefix) + 1 if prefix else 0 :].split("/")
            for i in range(1, len(parts) if recursive else min(len(parts), 2)):  # the directories on the way
                d = "/".join(filter(None, [prefix, *parts[:i]]))
                below = sorted((p, git_blob_oid(b)) for p, b in commit.files.items() if p.startswith(d + "/"))
                entries[d] = {"type": "directory", "oid": hashlib.sha1(repr(below).encode()).hexdigest(), "path": d}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
        if expand:
            for path, entry in entries.items():
                entry["lastCommit"] = _last_commit(repo, commit, path)
        return [entries[p] for p in sorted(entries)]

    def _commit_route(self, repo_id, repo_type, rev, query, headers, body):
        repo, user = self._writable(repo_id, headers, repo_type)
        if query.get("create_pr"):
            raise HubError(400, "This test server does not implement pull requests.")
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile: preupload never asks for LFS, so a client sending one is a bug worth seeing
                raise HubError(400, f"This test server accepts regular files only, got {key!r}.")
        with self.lock:
            parent = header.get("parentCommit")
            if parent and parent != repo.branches[rev]:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit = self._commit(
                repo, rev, header.get("summary", ""), header.get("description", ""), user[0], added, deleted
            )
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}{repo.url_path}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )


def push_dataset(
    server: HubServer, repo_id: str, files: dict[str, bytes], private: bool = False, message: str = "Upload dataset"
) -> str:
    """Seed a dataset repo straight into `server`'s state, with no client (so the test process need not import
    huggingface_hub): create `repo_id` if it does not exist, then commit `files` (path in repo -> bytes) onto its
    main branch as its owner. Returns the commit oid; `load_dataset(repo_id)` in a client sees it at once."""
    key = repo_key(repo_id, "dataset")
    if key not in server.repos:
        server.create_repo(repo_id, private=private, repo_type="dataset")
    with server.lock:
        repo = server.repos[key]
        return server._commit(repo, "main", message, "", repo_id.split("/")[0], dict(files), []).oid


def _namespaces(user) -> set[str]:
    return {user[0], *user[1]}


def _flag(query: dict, name: str) -> bool:
    """A boolean query or form parameter as the clients send it: true/True/1."""
    return str((query.get(name) or ["false"])[0]).lower() in ("true", "1")


def _last_commit(repo: Repo, commit: Commit, path: str) -> dict:
    """The newest commit up to `commit` that changed the file or directory at `path`, as the tree's `lastCommit`."""

    def below(c):
        return {p: d for p, d in c.files.items() if p == path or p.startswith(path + "/")} if c else {}

    while commit.parent and below(commit) == below(repo.commits.get(commit.parent)):
        commit = repo.commits[commit.parent]
    return {"id": commit.oid, "title": commit.title, "date": commit.date}


def _front_matter(content: str) -> dict | None:
    """A README's YAML metadata (what the Hub returns as `cardData`), None without a valid block."""
    end = content.find("\n---", 3) if content.startswith("---") else -1
    try:
        meta = yaml.safe_load(content[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return None
    return meta if isinstance(meta, dict) else None


def validate_card_metadata(content: str) -> list[str]:
    """The checks the Hub applies to a README.md's YAML block, as far as the tests need them."""
    if not content.startswith("---"):
        return []
    end = content.find("\n---", 3)
    if end < 0:
        return ["The YAML metadata block is not closed with '---'."]
    try:
        meta = yaml.safe_load(content[3:end])
    except yaml.YAMLError as e:
        return [f"Invalid YAML: {e}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["The metadata must be a mapping."]
    errors = []
    datasets = meta.get("datasets")
    if datasets is not None and (not isinstance(datasets, list) or any(not isinstance(d, str) for d in datasets)):
        errors.append('"datasets" must be a list of strings (no null entries)')
    for model in meta.get("model-index") or []:
        if not model.get("name"):
            errors.append('"model-index[].name" is required')
        for result in model.get("results") or []:
            if not (result.get("task") or {}).get("type"):
                errors.append('"model-index[].results[].task.type" is required')
            dataset = result.get("dataset") or {}
            if not dataset.get("type") or not dataset.get("name"):
                errors.append('"model-index[].results[].dataset" needs "type" and "name"')
            for metric in result.get("metrics") or []:
                if not metric.get("type") or "value" not in metric:
                    errors.append('"model-index[].results[].metrics[]" needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    hub: HubServer

    def log_message(self, *args):  # quiet: the tests read `hub.requests` instead
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method: str):
        url = urlsplit(self.path)
        body = self._body() if method in ("POST", "PUT") else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            status, extra, payload = self.hub.handle(method, url.path, parse_qs(url.query), headers, body)
        except HubError as e:
            status, extra, payload = e.status, {"X-Error-Message": e.message}, {"error": e.message}
            if e.code:
                extra["X-Error-Code"] = e.code
        except Exception as e:  # a server bug: answer 500 with the reason rather than hang the client
            status, extra, payload = 500, {"X-Error-Message": f"test hub crashed: {e!r}"}, {"error": repr(e)}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.hub.requests.append((method, url.path, status))
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("X-Request-Id", f"test-{len(self.hub.requests)}")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")


def hub_env(server: HubServer, token: str | None = WRITE_TOKEN, **extra) -> dict[str, str]:
    """The environment of a client process that talks to `server` instead of huggingface.co."""
    env = dict(os.environ)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        env.pop(name, None)
    env.update(
        HF_ENDPOINT=server.url,
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only fight over the shared CI cores
    if token is not None:
        env["HF_TOKEN"] = token
    env.update(extra)
    return env


@contextmanager
def running_hub():
    """A fresh in-memory Hub on 127.0.0.1 (a free port), stopped on exit; wrap it in a fixture."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()
