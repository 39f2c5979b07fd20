"""Real English text of domains other than Python's documentation, for out-of-domain evaluation.

Every text ships with the Debian system this project runs on (no download, nothing generated):

=============  ==============================================================================
licenses       the licence texts of ``/usr/share/common-licenses`` (package base-files): GPL,
               LGPL, GFDL, Apache, MPL, Artistic, CC0 (legal English); identical files
               (the GPL -> GPL-3 links) counted once
release-notes  upstream release notes, ``/usr/share/doc/*/NEWS[.gz]`` (e2fsprogs, systemd,
               glib, gnutls, dbus, coreutils, ...): the first ``DOC_CHARS`` characters of each
               (its newest releases), identical files once; Python's own NEWS left out (it is
               Python documentation, the calibration domain's neighbour)
gnu-manuals    GNU manuals in Info form, ``/usr/share/info/*.info*.gz`` (coreutils, grep, sed,
               find, diffutils, gzip, wget, gettext, gnupg, ...): node headers, menus, tag
               tables, indexes and licence appendices stripped, the first ``DOC_CHARS``
               characters of each manual
=============  ==============================================================================

``DEV_DOMAINS`` are the out-of-domain texts that choices may be made on; ``HELD_BACK`` is
kept back: nothing is tuned or reported on it until the work of issue 16 is done.

Evaluation windows: each document is tokenised on its own and cut into consecutive windows of
``seq_len`` tokens (a window never spans two documents; a document's tail shorter than a window
is dropped); ``n`` windows are then taken evenly spaced over the domain's list, so every model
is judged on the same tokens and every part of the domain is sampled.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rewriter.models.text import split_ids, token_ids

__all__ = ["DOMAINS", "DEV_DOMAINS", "HELD_BACK", "DOC_CHARS", "Domain", "documents",
           "domain_text", "eval_windows", "pydoc_windows"]

DOC_CHARS = 40_000  # per document of release-notes / gnu-manuals: no one package dominates
LICENSES = Path("/usr/share/common-licenses")
DOC = Path("/usr/share/doc")
INFO = Path("/usr/share/info")


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _tidy(text: str) -> str:
    """Trailing spaces off, tabs to spaces, runs of blank lines to one, form feeds out."""
    text = text.replace("\f", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _distinct(paths: list[Path], read: Callable[[Path], str]) -> list[tuple[str, str]]:
    """(path, text) for paths in sorted order, texts identical to an earlier one dropped."""
    seen: set[str] = set()
    out = []
    for p in sorted(paths):
        if not p.is_file():
            continue
        text = read(p)
        key = hashlib.sha256(text.encode()).hexdigest()
        if key in seen or not text:
            continue
        seen.add(key)
        out.append((str(p), text))
    return out


def _licenses() -> list[tuple[str, str]]:
    return _distinct(list(LICENSES.iterdir()) if LICENSES.is_dir() else [],
                     lambda p: _tidy(_read(p)))


def _release_notes() -> list[tuple[str, str]]:
    paths = [p for p in DOC.glob("*/NEWS*") if p.name in ("NEWS", "NEWS.gz")
             and not p.parent.name.startswith(("python", "libpython"))] if DOC.is_dir() else []
    return _distinct(paths, lambda p: _tidy(_read(p))[:DOC_CHARS])


_INFO_DROP = re.compile(r"^(File: .*Node: .*|\* Menu:|\* .*::.*|INFO-DIR-SECTION .*|"
                        r"(START|END)-INFO-DIR-ENTRY|This is .*, produced by makeinfo.*)$")


_INFO_SKIP_NODE = re.compile(r"Node: [^,]*(licen[cs]e|copying|fdl|gpl|index)", re.IGNORECASE)


def _info_text(path: Path) -> str:
    """An Info file's prose: nodes joined; node headers, menus, tag tables dropped, and the
    licence appendices (they belong to the licenses domain) and indexes left out."""
    nodes = _read(path).split("\x1f")
    keep = []
    for node in nodes:
        body = node.strip("\n")
        if body.startswith(("Tag Table:", "Indirect:", "End Tag Table", "Local Variables")):
            continue
        head = body.split("\n", 1)[0]
        if _INFO_SKIP_NODE.search(head) or "permitted to copy and distribute verbatim" in body:
            continue
        keep.append("\n".join(ln for ln in body.splitlines() if not _INFO_DROP.match(ln)))
    return _tidy("\n\n".join(keep))


def _gnu_manuals() -> list[tuple[str, str]]:
    if not INFO.is_dir():
        return []
    # one document per manual: find.info-1.gz and find.info-2.gz are parts of find's
    by_manual: dict[str, list[Path]] = {}
    for p in sorted(INFO.glob("*.info*.gz")):
        by_manual.setdefault(p.name.split(".info")[0], []).append(p)
    docs = []
    for name, parts in sorted(by_manual.items()):
        text = _tidy("\n\n".join(_info_text(p) for p in parts))
        if len(text) > 2000:  # the split manuals' index files (find.info.gz) hold no prose
            docs.append((str(INFO / name), text[:DOC_CHARS]))
    return docs


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    root: Path  # where its files are; absent on a system that is not Debian
    load: Callable[[], list[tuple[str, str]]]


DOMAINS = {d.name: d for d in (
    Domain("licenses", "licence texts, /usr/share/common-licenses", LICENSES, _licenses),
    Domain("release-notes", "upstream NEWS files, /usr/share/doc/*/NEWS*", DOC,
           _release_notes),
    Domain("gnu-manuals", "GNU Info manuals, /usr/share/info", INFO, _gnu_manuals),
)}
DEV_DOMAINS = ("licenses", "release-notes")
HELD_BACK = "gnu-manuals"


@functools.cache
def documents(name: str) -> tuple[tuple[str, str], ...]:
    """(source, text) of every document of domain ``name`` (read once per process). Raises
    FileNotFoundError when the system has none of them (not a Debian system)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(DOMAINS)}")
    docs = tuple(DOMAINS[name].load())
    if not docs:
        raise FileNotFoundError(f"no text of domain {name!r} on this system "
                                f"({DOMAINS[name].description})")
    return docs


def domain_text(name: str) -> str:
    """The domain's documents joined by blank lines."""
    return "\n\n".join(t for _, t in documents(name))


def _spaced(windows: list[torch.Tensor], n: int, name: str, seq_len: int) -> torch.Tensor:
    if len(windows) < n:
        raise ValueError(f"domain {name!r} has {len(windows)} windows of {seq_len} tokens, "
                         f"{n} asked for")
    idx = torch.linspace(0, len(windows) - 1, n).round().long().tolist()
    return torch.stack([windows[i] for i in idx])


def eval_windows(tokenizer, name: str, n: int, seq_len: int = 256) -> torch.Tensor:
    """(n, seq_len) int64 token ids of domain ``name``: windows evenly spaced over its
    documents (see the module docstring)."""
    windows: list[torch.Tensor] = []
    for _, text in documents(name):
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"],
                           dtype=torch.long)
        whole = ids.numel() // seq_len
        windows += list(ids[: whole * seq_len].view(whole, seq_len))
    return _spaced(windows, n, name, seq_len)


def pydoc_windows(tokenizer, n_calib: int, n_eval: int,
                  seq_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration (n_calib, seq_len) from the start, held-out evaluation (n_eval, seq_len)
    from the end) of pydoc_data.topics, split as the other benches split it."""
    return split_ids(token_ids(tokenizer), seq_len, n_calib, n_eval * seq_len)
