"""The docs tell the truth: every error code, setting and route is in the reference; every test, results
file and link that a Markdown file cites exists; and the docs speak of the service, not of how it was made.
Fast: no Redis, no network, no model."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import cache
from itertools import product
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from shared.config import Settings
from shared.errors import Code

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "api.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
# Folders that hold no docs of ours: tools' caches, installs and build outputs (and every hidden folder).
NOT_DOCS = {"node_modules", "build", "dist", "site-packages", "__pycache__"}
HTTP_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[ \t]*$", re.MULTILINE | re.DOTALL)


def _skipped(folder: str) -> bool:
    return folder.startswith(".") or folder in NOT_DOCS or folder.endswith(".egg-info")


@cache
def markdown_files() -> tuple[Path, ...]:
    """Every Markdown file of the repository, outside hidden folders, installs and build outputs."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if not _skipped(d))
        found += [Path(folder, f) for f in sorted(files) if f.endswith(".md")]
    return tuple(found)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def unfenced(text: str) -> str:
    """The text without its fenced code blocks, line numbers kept."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def prose(text: str) -> str:
    """The text without code blocks and inline code, line numbers kept: where links are links."""
    text = unfenced(text)
    return re.sub(r"(`+)(?!`).+?(?<!`)\1(?!`)", "", text)


def lines_of(text: str) -> Iterator[tuple[int, str]]:
    return enumerate(text.splitlines(), start=1)


def section(text: str, title: str) -> str:
    """The body of the heading named `title`, down to the next heading of its level or above."""
    found = re.search(rf"^(#+)[ \t]+{re.escape(title)}[ \t]*$", text, re.MULTILINE)
    assert found, f"no heading {title!r}"
    level = len(found.group(1))
    end = re.compile(rf"^#{{1,{level}}}[ \t]", re.MULTILINE).search(text, found.end())
    return text[found.end() : end.start() if end else len(text)]


# (a) error codes ---------------------------------------------------------------------------------------


def error_table_codes() -> set[str]:
    """The codes named in the first cell of each row of docs/api.md's "Error codes" table."""
    body = section(API_DOC.read_text(), "Error codes")
    return set(re.findall(r"^\|\s*`([^`|]+)`\s*\|", body, re.MULTILINE))


def test_every_error_code_is_in_the_api_reference() -> None:
    documented = error_table_codes()
    missing = [c.value for c in Code if c.value not in documented]
    assert not missing, f"codes missing from the error table of docs/api.md: {missing}"


def test_the_error_table_names_only_codes_that_exist() -> None:
    unknown = sorted(error_table_codes() - {c.value for c in Code})
    assert not unknown, f"codes in docs/api.md's error table that shared/errors.py does not define: {unknown}"


# (b) settings ------------------------------------------------------------------------------------------


def setting_variables() -> dict[str, str]:
    """Each Settings field's environment variable: its alias if it has one, else prefix + name."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    out: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        alias: Any = field.validation_alias or field.alias
        choices = (
            [alias] if isinstance(alias, str) else [c for c in getattr(alias, "choices", []) if isinstance(c, str)]
        )
        out[name] = (choices[0] if choices else prefix + name).upper()
    return out


def names(variable: str) -> re.Pattern[str]:
    """The variable as a whole word: INPAINT_COMPILE is not found in INPAINT_COMPILE_SIZES."""
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(variable)}(?![A-Za-z0-9_])")


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = CONFIG_DOC.read_text()
    missing = [var for var in setting_variables().values() if not names(var).search(text)]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


@cache
def python_sources() -> str:
    """Every Python file of the repository's own code and tests, joined."""
    parts = []
    for top in ("api", "shared", "workers", "stack", "client", "tests", "benchmarks"):
        for folder, subfolders, files in os.walk(ROOT / top):
            subfolders[:] = [d for d in subfolders if not _skipped(d)]
            paths = [Path(folder, f) for f in files if f.endswith(".py")]
            parts += [p.read_text() for p in paths if p.resolve() != Path(__file__).resolve()]
    return "\n".join(parts)


def test_the_configuration_reference_names_only_variables_something_reads() -> None:
    settings = set(setting_variables().values())
    cited = set(re.findall(r"(?<![A-Za-z0-9_])INPAINT_[A-Z0-9_]*[A-Z0-9]", CONFIG_DOC.read_text()))
    read_elsewhere = {v for v in cited - settings if names(v).search(python_sources())}
    unknown = sorted(cited - settings - read_elsewhere)
    assert not unknown, f"variables in docs/configuration.md that no setting or code reads: {unknown}"


# (c) routes --------------------------------------------------------------------------------------------


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, into included routers too (FastAPI may keep them whole)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _walk(inner.routes, prefix + str(getattr(getattr(route, "include_context", None), "prefix", "")))
            continue
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            continue
        methods = getattr(route, "methods", None)
        if methods is None:  # a mount: the files under the path, written `GET /static/…`
            yield "GET", prefix + path.rstrip("/") + "/…"
            continue
        yield from ((m, prefix + path) for m in sorted(set(methods) & HTTP_METHODS))


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], bool]:
    """What the app serves, each marked True when FastAPI made it to document the API (such routes need
    no entry of their own). Building the app opens no connection: nothing answers at that Redis address."""
    from api.app import create_app

    data = tmp_path_factory.mktemp("data")
    app = create_app(Settings(environment="test", data_dir=data, redis_url="redis://127.0.0.1:9/0"))
    found = set(_walk(app.routes))
    for path, operations in app.openapi()["paths"].items():
        found |= {(m.upper(), path) for m in operations if m.upper() in HTTP_METHODS}
    auto = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url} - {None}
    return {(m, p): p in auto for m, p in found}


def route_pattern(method: str, path: str) -> re.Pattern[str]:
    """`METHOD path` as the docs write it: any name for a path parameter; a mount's files below it."""
    mount = path.endswith("/…")
    template = re.sub(r"\\\{[^}]*\\\}", r"\\{[^}/]*\\}", re.escape(path.removesuffix("…")))
    end = "" if mount else r"(?![\w/{}-]|\.\w)"
    return re.compile(rf"(?<![A-Z]){method} {template}{end}")


def test_every_route_is_in_the_api_reference(app_routes: dict[tuple[str, str], bool]) -> None:
    text = API_DOC.read_text()
    missing = sorted(
        f"{m} {p}" for (m, p), auto in app_routes.items() if not auto and not route_pattern(m, p).search(text)
    )
    assert not missing, f"routes missing from docs/api.md: {missing}"


def test_the_api_reference_names_only_routes_that_exist(app_routes: dict[tuple[str, str], bool]) -> None:
    # Outside code blocks, where a request to a webhook receiver may be shown.
    text = unfenced(API_DOC.read_text())
    cited = set(re.findall(rf"(?<![A-Z])({'|'.join(HTTP_METHODS)}) (/[\w/{{}}.-]*)", text))
    unknown = sorted(
        f"{m} {p}"
        for m, p in ((m, p.rstrip(".")) for m, p in cited)
        if not any(route_pattern(m, path).match(f"{m} {p}") for m2, path in app_routes if m2 == m)
    )
    assert not unknown, f"routes in docs/api.md that the app does not serve: {unknown}"


# (d) tests cited ---------------------------------------------------------------------------------------

TEST_NAME = re.compile(r"(?<![\w-])test_\w+")


@cache
def known_tests() -> frozenset[str]:
    """Names of the test functions and test files (without .py) under tests/."""
    found: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        found.add(path.stem)
        found |= set(re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)", path.read_text(), re.MULTILINE))
    return frozenset(found)


def test_every_cited_test_exists() -> None:
    missing = [
        f"{rel(md)}:{n}: {name}"
        for md in markdown_files()
        for n, line in lines_of(md.read_text())
        for name in TEST_NAME.findall(line)
        if name not in known_tests()
    ]
    assert not missing, f"tests cited in Markdown that are no test function or file in tests/: {missing}"


# (e) results cited -------------------------------------------------------------------------------------

RESULT = re.compile(r"benchmarks/results/[^\s`'\"()<>\[\]]+")


def expand(pattern: str) -> list[str]:
    """`a-{x,y}.json` as [`a-x.json`, `a-y.json`]; `…` as a wildcard."""
    parts = re.split(r"\{([^{}]*)\}", pattern.replace("…", "*"))
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in product(*choices)]


def test_every_cited_benchmark_result_exists() -> None:
    missing = []
    for md in markdown_files():
        for n, line in lines_of(md.read_text()):
            for cited in RESULT.findall(line):
                cited = cited.rstrip(".,;:")
                if not all(any(ROOT.glob(p)) for p in expand(cited)):
                    missing.append(f"{rel(md)}:{n}: {cited}")
    assert not missing, f"benchmark results cited in Markdown that do not exist: {missing}"


# (f) links ---------------------------------------------------------------------------------------------

INLINE_LINK = re.compile(r"\]\(\s*<?([^()\s<>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s<>]+)>?", re.MULTILINE)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def links(md: Path) -> Iterator[tuple[int, str, Path, str]]:
    """(line, target as written, the file it names, its #anchor) of each link to something of ours."""
    for n, line in lines_of(prose(md.read_text())):
        for target in INLINE_LINK.findall(line) + REFERENCE_LINK.findall(line):
            if SCHEME.match(target):
                continue  # http(s), mailto: not ours
            path, _, anchor = target.partition("#")
            path = unquote(path)
            if not path:
                file = md
            elif path.startswith("/"):
                file = ROOT / path.lstrip("/")
            else:
                file = md.parent / path
            yield n, target, Path(os.path.normpath(file)), anchor


def test_every_relative_link_resolves_inside_the_repository() -> None:
    broken, outside = [], []
    for md in markdown_files():
        for n, target, file, _ in links(md):
            if not file.is_relative_to(ROOT):
                outside.append(f"{rel(md)}:{n}: {target}")
            elif not file.exists():
                broken.append(f"{rel(md)}:{n}: {target}")
    assert not outside, f"Markdown links that point outside the repository: {outside}"
    assert not broken, f"Markdown links to files or folders that do not exist: {broken}"


def slugs(md: Path) -> set[str]:
    """The anchors GitHub gives the file's headings (and any explicit `id`/`name`)."""
    text = md.read_text()
    seen: dict[str, int] = {}
    out = set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", unfenced(text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


def test_every_link_to_a_heading_finds_it() -> None:
    broken = [
        f"{rel(md)}:{n}: {target}"
        for md in markdown_files()
        for n, target, file, anchor in links(md)
        if anchor
        and file.suffix == ".md"
        and file.is_file()
        and file.is_relative_to(ROOT)
        and anchor not in slugs(file)
    ]
    assert not broken, f"Markdown links to headings that do not exist: {broken}"


# (g) how the project was made --------------------------------------------------------------------------

# Phrases about the making of the project, not about the service; each narrow enough that the service's
# own words ("user-agent", "the tools built on it", "NVIDIA container toolkit") do not match.
MAKING = {
    "a working session": r"\bthis\s+session\b|\b(?:helper|agent|coding|work) sessions?\b",
    "an agent or assistant": r"\bsub-?agents?\b|\b(?:AI|LLM|coding) (?:agents?|assistants?)\b",
    "the device machinery": r"\bdevice (?:tool|machine)s?\b",
    "a path outside the repository": r"\.\./shared\b|(?<![\w.~-])/(?:work|home|Users)/",
    "the team's reference files": r"\b(?:CONTRACT|STYLE)\.md\b",
    "an issue number": r"\bissues? #?\d+",
    "a brief": r"\bthe brief\b",
}


def test_no_markdown_file_speaks_of_how_the_project_was_made() -> None:
    found = [
        f"{rel(md)}:{n}: {what}: {match.group(0)!r}"
        for md in markdown_files()
        for n, line in lines_of(md.read_text())
        for what, pattern in MAKING.items()
        for match in re.finditer(pattern, line, re.IGNORECASE)
    ]
    assert not found, f"Markdown that speaks of how the project was made: {found}"
