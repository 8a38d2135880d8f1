"""The docs stay true: what README.md and docs/*.md name exists in the code (unit tier, no server).

Checked, in backticks or code blocks of every document:

- module paths (``latentsync/serving/egress/outputs.py``, ``playout/tap.py``, ``runtime/channel.py``): the file
  exists in the repository, under ``latentsync/`` or under ``latentsync/serving/``; a bare name (``mixer.py``)
  is some file of the repository;
- a class or function given with its module (```TappedSink` (`playout/tap.py`)``, ```playout/mixer.py`
  (`ProgramMixer.switch_idle`)``): defined in that module;
- a part placed in a module (``state machine (`serving/playout/state.py`)``, ```x.py` (tick tap, ...)``): that
  module holds it (:data:`CONCEPTS`: the move table ``check_table``, the class ``TappedSink``);
- dotted config keys (``avatar.fit``, ``engine.latentsync.unet_path``, ``pool.ray_*``): a field of the config
  dataclasses of ``latentsync/config/`` (or of the ``/health`` snapshot: ``webrtc.inbox_dropped_ticks``);
- endpoints after an HTTP method (``GET /avatars/<id>``; a stem such as ``PUT /channels`` names its family):
  a route of the Flask app;
- the stream state machine of docs/architecture.md: its diagram names every ``StreamState`` and its move table
  is ``STREAM_MOVES``; its layer table names every module of ``latentsync/serving/``.

The README's curl examples run against a real server in tests/serving/api/test_readme_examples.py.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
import typing
from pathlib import Path

import pytest

from latentsync.config import AppConfig
from latentsync.serving.telemetry.health import HealthSnapshot

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "checkpoints" / "README.md"]

#: Names in the docs that look like something checked here and are not, each with its reason.
IGNORED = {
    "scripts/inference.py": "the original LatentSync repository's script, named in docs/latentsync.md",
}

_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
_PATH = re.compile(r"(?<![\w./~$-])((?:[\w-]+/)*[\w-]+\.py)\b")
_DEF = "(?:class|def|async def)"
_METHOD_PATH = re.compile(r"\b(GET|POST|PUT|DELETE|PATCH|OPTIONS) (/[^\s`,;)|]*)")
_KEY = re.compile(r"(?<![\w./$-])([a-z_]+(?:\[\])?(?:\.(?:[a-z_0-9]+\*?|\*|[a-z_0-9]+\[\]))+)(?![\w(/-])")
_FILE_EXTENSIONS = {"npy", "py", "yaml", "yml", "json", "md", "sh", "mp4", "wav", "mkv", "txt", "toml", "service", "pt"}


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _code(text: str) -> list[str]:
    """The backticked spans and fenced blocks of a Markdown text (where names of code are written)."""
    blocks = _FENCE.findall(text)
    rest = _FENCE.sub("", text)
    return blocks + _CODE_SPAN.findall(rest)


@functools.cache
def _files_named(name: str) -> tuple[Path, ...]:
    """The repository's files called ``name`` (a bare file name), sorted; virtualenvs, caches and dot-folders
    (``.git``, ``.venv``, ``.cache``: hundreds of thousands of files) are not walked."""
    return tuple(p for p in _repo_files() if p.name == name)


@functools.cache
def _repo_files() -> tuple[Path, ...]:
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")) and d not in ("node_modules",))
        found += [Path(root, f) for f in sorted(files)]
    return tuple(found)


def _resolve(name: str) -> Path | None:
    """Where a module path of the docs is: in the repository, under latentsync/, under latentsync/serving/."""
    if name.startswith("tests/data/"):
        return None
    if "/" not in name:
        return next(iter(_files_named(name)), None)
    for base in (REPO, REPO / "latentsync", REPO / "latentsync" / "serving", REPO / "clients" / "python" / "src"):
        if (base / name).is_file():
            return base / name
    return None


def _defines(module: Path, dotted: str) -> bool:
    """Whether ``module`` defines ``Name`` or ``Class.method`` (a class, function, method or module-level name)."""
    source = _text(module)
    for part in dotted.split("."):
        if not re.search(rf"^\s*(?:{_DEF} {re.escape(part)}\b|{re.escape(part)}\s*[:=])", source, re.M):
            return False
    return True


def _doc_ids():
    return [pytest.param(p, id=p.relative_to(REPO).as_posix()) for p in DOCS]


def test_every_ignored_name_is_still_named_and_missing():
    """An entry of :data:`IGNORED` that no document names, or that exists now, goes (the list stays small)."""
    named = {n for doc in DOCS for span in _code(_text(doc)) for n in _PATH.findall(span)}
    assert all(n in named and _resolve(n) is None for n in IGNORED), sorted(n for n in IGNORED if n not in named)


@pytest.mark.parametrize("doc", _doc_ids())
def test_named_modules_exist(doc: Path):
    missing = set()
    for span in _code(_text(doc)):
        for name in _PATH.findall(span):
            if name not in IGNORED and _resolve(name) is None:
                missing.add(name)
    assert not missing, f"{doc.name} names modules that do not exist: {sorted(missing)}"


_NAME_THEN_MODULE = re.compile(r"`([A-Z]\w*(?:\.\w+)?)` \(`((?:[\w-]+/)*[\w-]+\.py)`")
_MODULE_THEN_CLASS = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)` \(`([A-Z]\w*(?:\.\w+)?)`")
_MODULE_THEN_NAMES = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)` \(((?:`[\w.]+(?:\(\))?`(?:, | and )?)+)\)")


@pytest.mark.parametrize("doc", _doc_ids())
def test_names_given_with_a_module_are_defined_there(doc: Path):
    text = _text(doc)
    pairs = [(m, n) for n, m in _NAME_THEN_MODULE.findall(text)] + _MODULE_THEN_CLASS.findall(text)
    for module, names in _MODULE_THEN_NAMES.findall(text):
        pairs += [(module, n) for n in re.findall(r"`([\w.]+(?:\(\))?)`", names)]
    wrong = []
    for module, name in pairs:
        path = _resolve(module)
        if module in IGNORED or path is None or not re.match(r"[A-Z]\w*(\.\w+)?$|\w+\(\)$", name):
            continue  # a class, Class.method or function(): not a config key or a file name
        name = name.removesuffix("()")
        paths = [path] if "/" in module else list(_files_named(module))
        if not any(_defines(p, name) for p in paths):
            wrong.append(f"{name} not in {module}")
    assert not wrong, f"{doc.name}: {wrong}"


#: Parts of the server the docs place in a module, and what that module then holds.
CONCEPTS = {"state machine": "check_table(", "tick tap": "class TappedSink"}
_CONCEPT_THEN_MODULE = re.compile(r"(state machine|tick tap)[^`\n(,;]{0,40}\(`((?:[\w-]+/)*[\w-]+\.py)`\)", re.I)
_MODULE_THEN_WORDS = re.compile(r"`((?:[\w-]+/)*[\w-]+\.py)` \(([^)]*)\)")


@pytest.mark.parametrize("doc", _doc_ids())
def test_parts_live_where_they_are_said_to(doc: Path):
    """``the state machine (`x.py`)``, ```x.py` (tick tap, ...)``: that module holds it (its move table, its class)."""
    text = _text(doc)
    claims = [(concept.lower(), module) for concept, module in _CONCEPT_THEN_MODULE.findall(text)]
    claims += [
        (c, module) for module, words in _MODULE_THEN_WORDS.findall(text) for c in CONCEPTS if c in words.lower()
    ]
    wrong = []
    for concept, module in claims:
        path = _resolve(module)
        if path is None or CONCEPTS[concept] not in _text(path):
            wrong.append(f"{concept} in {module}")
    assert not wrong, f"{doc.name} places parts in modules that do not hold them: {wrong}"


def _config_fields(tp) -> dict[str, object] | None:
    """The fields of a config dataclass type (through ``X | None`` and ``list[X]``), or None if it is no dataclass."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) or origin is list:
        for arg in typing.get_args(tp):
            fields = _config_fields(arg)
            if fields is not None:
                return fields
        return None
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return {f.name: hints[f.name] for f in dataclasses.fields(tp)}
    return None


def _config_key_exists(key: str, root: object = AppConfig) -> bool:
    """Whether a dotted key (``a.b``, ``a[].b``, ``a.b_*``) names a field under the dataclass ``root``."""
    tp: object = root
    for part in key.replace("[]", "").split("."):
        fields = _config_fields(tp)
        if fields is None:
            return False
        if part == "*":
            return True
        if part.endswith("*"):
            return any(name.startswith(part[:-1]) for name in fields)
        if part not in fields:
            return False
        tp = fields[part]
    return True


SECTIONS = {f.name for f in dataclasses.fields(AppConfig)}


@pytest.mark.parametrize("doc", _doc_ids())
def test_config_keys_exist(doc: Path):
    unknown = set()
    for span in _code(_text(doc)):
        for key in _KEY.findall(span):
            head, last = key.split(".", 1)[0].removesuffix("[]"), key.rsplit(".", 1)[-1]
            if head not in SECTIONS or last in _FILE_EXTENSIONS:
                continue
            if not _config_key_exists(key) and not _config_key_exists(key, HealthSnapshot):  # or a /health field
                unknown.add(key)
    assert not unknown, f"{doc.name} names config keys the config does not have: {sorted(unknown)}"


@pytest.fixture(scope="module")
def url_map():
    from latentsync.config import load_config
    from latentsync.serving.api.app import create_app
    from latentsync.serving.runtime.runtime import Runtime

    return create_app(Runtime(load_config(None, []))).url_map.bind("127.0.0.1")  # built, never started


@pytest.mark.parametrize("doc", _doc_ids())
def test_endpoints_exist(doc: Path, url_map):
    from werkzeug.exceptions import MethodNotAllowed, NotFound
    from werkzeug.routing import RequestRedirect, WebsocketMismatch

    missing = set()
    rules = [(rule.rule, rule.methods or set()) for rule in url_map.map.iter_rules()]
    for method, path in _METHOD_PATH.findall(_text(doc)):
        bare = re.split(r"[?#\[]", path)[0].rstrip(".:")
        concrete = re.sub(r"<[^>]*>|…|\.\.\.", "x", bare)
        try:
            url_map.match(concrete or "/", method=method)
        except (RequestRedirect, WebsocketMismatch):  # served (a WebSocket route: GET /ws/speech)
            pass
        except (NotFound, MethodNotAllowed):
            # a family named by its stem (`PUT /channels`, `POST`/`DELETE /whep`): some route of it has that method
            if not any(rule.startswith(f"{bare}/") and method in methods for rule, methods in rules):
                missing.add(f"{method} {path}")
    assert not missing, f"{doc.name} names endpoints the app does not serve: {sorted(missing)}"


def test_the_stream_state_machine_in_architecture_md_is_the_code():
    from latentsync.serving.playout.state import STREAM_MOVES, StreamState

    section = _text(REPO / "docs" / "architecture.md").split("## The stream state machine", 1)[1].split("\n## ", 1)[0]
    diagram = _FENCE.findall(section)[0]
    assert all(s.name in diagram for s in StreamState), diagram
    rows = re.findall(r"^\| `([A-Z_]+)` \| (.*?) \|$", section, re.M)
    table = {StreamState[a]: frozenset(StreamState[b] for b in re.findall(r"`([A-Z_]+)`", to)) for a, to in rows}
    assert table == STREAM_MOVES, f"the move table of docs/architecture.md is not STREAM_MOVES: {table}"


def test_the_layer_table_names_every_serving_module():
    text = _text(REPO / "docs" / "architecture.md")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| \d+ \| (.*?) \|.*$", text, re.M)}
    missing = []
    for folder in sorted(p for p in (REPO / "latentsync" / "serving").iterdir() if (p / "__init__.py").is_file()):
        row = next((r for cell, r in rows.items() if f"`{folder.name}/`" in cell), None)
        assert row is not None, f"docs/architecture.md's layer table has no row for {folder.name}/"
        missing += [f"{folder.name}/{m.name}" for m in sorted(folder.glob("[!_]*.py")) if f"`{m.name}`" not in row]
    assert not missing, f"docs/architecture.md's layer table does not name: {missing}"
