"""Every data path is an fsspec URL: plain paths, file://, memory:// and s3:// share this code.

Listing, batched concurrent reads (s3fs's async `cat_ranges` on many paths at once), and atomic writes
(write under a temporary name, then move into place) live here and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import posixpath
import re
import shlex
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.spec import AbstractFileSystem

from ae_core.errors import AeError


@dataclass(frozen=True, slots=True)  # slots: ~100 bytes less per listed object
class ObjectInfo:
    """One candidate object under SOURCE. `key` is its path relative to SOURCE, '/'-separated."""

    key: str
    path: str
    size: int
    tag: str = ""  # change detector from the listing: S3 ETag, else size and modification time
    # a local file's identity beyond its tag: inode and status-change time ("ino:ctime_ns"; of the
    # target, for a symlink). A file swapped in by `mv`, or copied with its mtime kept (cp -p,
    # rsync, unzip), has the old size and mtime but not these. "" where the store has none
    stat: str = ""


def open_store(url: str, options: Mapping[str, dict] | None = None) -> tuple[AbstractFileSystem, str]:
    """Resolve an fsspec URL (or plain path) into a filesystem and a root path without a slash.

    `options` maps a protocol ("s3") to fsspec storage options for it (credentials from a Prefect
    block, say); without them fsspec's own configuration and the AWS variables apply.
    """
    if not url.strip():  # fsspec would take it for the working directory
        raise AeError("an empty path or URL; give a folder or an fsspec URL such as s3://bucket/prefix")
    _refuse_double_colon(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    for scheme, rest in _chain(url):
        if scheme in _USERINFO_IS_BUCKET and "@" in rest.split("/", 1)[0]:
            # s3fs would take "user:secret@bucket" for the bucket's name and echo it in its error
            raise AeError(f"{redact_url(url)!r}: credentials in the URL are not used (the part before "
                          "@ would be read as the bucket); give the URL without them, and the credentials as the "
                          "store reads them (for S3: --aws-credentials-block, the AWS variables or a profile)")
        if scheme in _BUCKETED and "//" in rest.rstrip("/"):
            raise AeError(f"{redact_url(url)!r} has an empty path part (//); remove the extra slash (keys "
                          "with empty parts are not supported: they defeat the check that OUTPUT is not in SOURCE)")
    try:
        fs, root = url_to_fs(url, **dict((options or {}).get(protocol, {})))
    except (ValueError, ImportError) as err:
        raise AeError(f"cannot open {redact_url(url)!r}: {err}; use a local path or an fsspec URL "
                      "such as file://, s3:// or memory://") from err
    except Exception as err:  # noqa: BLE001 - a zip:// that is no zip, an FTP host that refuses: one line
        if is_connection_error(err):
            raise AeError(f"cannot open {redact_url(url)!r}: cannot reach the store ({_first_line(err)}); check "
                          "the host name in the URL and the network", transient=True) from err
        raise AeError(f"cannot open {redact_url(url)!r} ({type(err).__name__}: {_first_line(err)}); check that "
                      "it exists and is what its URL says (zip:// a zip file, tar:// a tar file)") from err
    if _protocol(fs) in _BUCKETED and not root.strip("/"):
        raise AeError(f"{redact_url(url)!r} names no bucket; give {_protocol(fs)}://bucket or {_protocol(fs)}://bucket/prefix")
    return fs, root.rstrip("/") or root


# an IPv6 host in brackets with a '::' in it (the host part of a URL): fsspec would cut the URL there
_SHORT_IPV6 = re.compile(r"(?:^|::)[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@\[]*@)?\[[0-9A-Za-z.%:]*::[0-9A-Za-z.%:]*\]")


def _refuse_double_colon(url: str) -> None:
    """fsspec cuts every URL at '::', the separator of a chain (simplecache::s3://...). A '::'
    that is not one, in an IPv6 host or in a folder's name, would open another place than the
    one named ('/data/a::b' opened '/data/a'): refused with the fix."""
    if "::" not in url:
        return
    if _SHORT_IPV6.search(url):
        raise AeError(f"{redact_url(url)!r}: an IPv6 address written with '::' cannot be used, as fsspec reads "
                      "'::' as the separator of a chained URL; write the address in full (e.g. "
                      "[0:0:0:0:0:0:0:1] for [::1]) or use a host name")
    parts = _chain_parts(url)
    heads = [part.split("://", 1)[0] for part in parts[:-1]]  # each link before the last names a protocol
    if len(parts) == 1 or not all(heads) or not all(h in fsspec.available_protocols() for h in heads):
        raise AeError(f"{redact_url(url)!r}: '::' separates the URLs of an fsspec chain (as in "
                      "simplecache::s3://bucket/prefix), and what stands before it here is not a protocol; a path "
                      "with '::' in a name cannot be used: rename that folder or file, or link it under another name")


def _chain_parts(url: str) -> list[str]:
    """The URLs of a chain (simplecache::s3://...), split on '::' outside [brackets], so that a
    URL with an IPv6 host is read whole (and open_store refuses it with the fix)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(url):
        if url[i] == "[":
            depth += 1
        elif url[i] == "]":
            depth = max(0, depth - 1)
        elif url.startswith("::", i) and depth == 0:
            parts.append(url[start:i])
            start, i = i + 2, i + 2
            continue
        i += 1
    return [*parts, url[start:]]


def _chain(url: str) -> Iterator[tuple[str, str]]:
    """(scheme in lower case, what follows ://) of each URL of a chain (simplecache::s3://...)
    that has a scheme."""
    for part in _chain_parts(url):
        scheme, _, rest = part.partition("://")
        if rest:
            yield scheme.lower(), rest


def refuse_password(url: str, role: str) -> None:
    """A run's SOURCE or OUTPUT with user:password@ (http, ftp, sftp...): refused, as the URL is
    kept with the run (Prefect's flow-run parameters, reject details). The query commands, which
    store nothing, accept one."""
    for scheme, rest in _chain(url):
        if scheme in _HOSTED and ":" in re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[0]:
            example = ('{"https": {"headers": {"Authorization": "Basic ..."}}}' if scheme.startswith("http")
                       else f'{{"{scheme}": {{"username": "...", "password": "..."}}}}')
            raise AeError(f"{role} {redact_url(url)!r}: a password in the URL is refused, as it would be stored "
                          "with the run (Prefect's flow-run parameters, the rejects table); give the URL without "
                          f"it and the credentials in fsspec's configuration (FSSPEC_CONFIG_DIR, e.g. {example})")


def display_url(fs: AbstractFileSystem, path: str) -> str:
    """A URL for users: a plain absolute path for local files (faiss and pandas open those)."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs: AbstractFileSystem) -> bool:
    return _protocol(fs) in ("file", "local")


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts)


def key_matches(key: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Glob filters on keys (fnmatch: `*` also matches `/`, so `*.jpg` is any depth), where a
    `**/` also matches no folder at all (`**/*.png` takes top-level PNGs too): empty include =
    everything; exclude wins over include."""
    if include and not any(_glob(key, pat) for pat in include):
        return False
    return not any(_glob(key, pat) for pat in exclude)


def _glob(key: str, pat: str) -> bool:
    at = pat.find("**/")
    while at > 0 and pat[at - 1] != "/":  # only a whole `**` segment
        at = pat.find("**/", at + 1)
    if at < 0:
        return fnmatch.fnmatchcase(key, pat)
    return fnmatch.fnmatchcase(key, pat) or _glob(key, pat[:at] + pat[at + 3:])


def list_objects(fs: AbstractFileSystem, root: str, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), skip_prefix: str | None = None) -> Iterator[ObjectInfo]:
    """Yield every object under `root` (any name, any extension), folder by folder, sorted by key.

    `skip_prefix` (a path) is left out: an OUTPUT inside SOURCE must never be read back as input.
    """
    if not underlying(fs).isdir(root):  # simplecache:: answers False for an http folder
        what = "a file, not a folder" if fs.exists(root) else "missing"
        raise AeError(f"source {display_url(fs, root)!r} is {what}; give the folder or prefix "
                      "that holds the images")
    local = is_local(underlying(fs))  # simplecache::file:// too: fsspec's walk omits unreadable folders
    prefix = root.rstrip("/") + "/"

    web = is_read_only(fs)

    def key_of(path: str) -> str:
        if path.startswith(prefix):
            # an http(s) listing links to names percent-encoded: the key is the name ("a b.png",
            # as from a local folder), unless the escapes are not UTF-8 (kept as they are)
            return _unquoted(path[len(prefix):]) if web else path[len(prefix):]
        # a zip's or tar's root ("" as root): the whole member path, or a/x.png and b/x.png shared a key
        return path.lstrip("/") if not root.strip("/") else posixpath.basename(path)

    walk = (_walk_local(root, skip_prefix, exclude=exclude, include=include) if local
            else _walk_fsspec(fs, root, skip_prefix, lambda p: key_matches(key_of(p), include, exclude),
                              lambda folder: _left_out(_unquoted(folder) if web else folder, include, exclude)))
    for path, size, tag, ident in walk:
        key = key_of(path)
        if local and (not key.isascii() or "\\x" in key):  # S3 keys are UTF-8 by definition
            key = utf8_key(key)
        if not local or key_matches(key, include, exclude):  # _walk_fsspec kept only the wanted ones
            yield ObjectInfo(key=key, path=path, size=size, tag=tag, stat=ident)


# In a local key, \\x5c is a backslash of the name and \\x80-\\xff a byte that is not UTF-8.
_KEY_ESCAPE = re.compile(r"\\x(5c|[89a-f][0-9a-f])")


def utf8_key(name: str) -> str:
    """A key every table can hold: a local file name that is not valid UTF-8 (Python keeps its
    bytes as surrogates; a Latin-1 zip unpacked on Linux, say) gets each such byte written as
    \\xNN. So that no two names share a key, a backslash of the name that starts such an escape
    is itself written \\x5c (`caf\\xe9.png` as typed is `caf\\x5cxe9.png`). The file is still
    read by its real path (key_path)."""
    if "\\x" in name:
        name = re.sub(r"\\(?=x(?:5c|[89a-f][0-9a-f]))", r"\\x5c", name)
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unquoted(name: str) -> str:
    try:
        return unquote(name, errors="strict")
    except UnicodeDecodeError:
        return name


def key_path(fs: AbstractFileSystem, root: str, key: str) -> str:
    """Where an object with this key is: `root/key`, or for a local key with escapes (utf8_key),
    the file under its real name; on an http(s) store the key percent-encoded again."""
    if is_read_only(fs):
        try:  # a key kept encoded (its escapes are not UTF-8) is the link itself
            unquote(key, errors="strict")
        except UnicodeDecodeError:
            return join(root, key)
        return join(root, quote(key, safe="/"))
    if is_local(fs) and _KEY_ESCAPE.search(key):
        raw = join(root, _KEY_ESCAPE.sub(lambda m: "\\" if m.group(1) == "5c" else chr(0xDC00 + int(m.group(1), 16)), key))
        # a table written before backslashes were escaped keys a real `a\xe9.png` as itself
        if os.path.lexists(raw) or not os.path.lexists(join(root, key)):
            return raw
    if key.startswith("/"):  # an S3 key with an empty segment (src//a.png): join would drop the root
        return root.rstrip("/") + "/" + key
    return join(root, key)


def _walk_fsspec(fs: AbstractFileSystem, root: str, skip_prefix: str | None,
                 wanted: Callable[[str], bool] = lambda path: True,
                 pruned: Callable[[str], bool] = lambda folder: False) -> Iterator[tuple[str, int, str, str]]:
    """(path, size, tag, "") of every non-folder under `root`, sorted by path. On an object store,
    one flat listing (`find`): a walk splits keys at "/" and on S3 lost a key with an empty
    segment (`a//b.png`, from joining `prefix/` and `/name`), neither a row nor a reject; in an
    archive (zip, tar), where `ls` reads every member each time, `find` too. On a server
    (http(s), ftp, sftp...), folder by folder (`_find_tree`). `pruned(folder)`:
    a folder the user's patterns leave out, not listed."""
    fs.invalidate_cache(root)  # every run sees the store as it is now, not a cached listing
    marker = root.rstrip("/")
    found = (_find_tree(fs, root, pruned) if _protocol(underlying(fs)) in _HOSTED
             else fs.find(root, withdirs=False, detail=True))
    entries = []
    for name in sorted(found):
        info = found[name]
        path = info.get("name", name)
        if info.get("type") == "directory" or (skip_prefix and _under(path, skip_prefix)):
            continue
        if path == marker or (path.endswith("/") and not info.get("size")):
            continue  # an S3 "folder" marker (a zero-byte key ending in /), not an image; with bytes, a candidate
        if wanted(path):  # --include/--exclude before any HEAD request
            entries.append((path, info))
    versions = _versions_of_unversioned(fs, [p for p, info in entries if info.get("size") is None])
    for path, info in entries:
        info = versions.get(path, info)
        tag = listing_tag(info)
        if unversioned(tag):
            tag = f"unknown:{uuid.uuid4().hex}"
        yield path, int(info.get("size") or 0), tag, ""


def _find_tree(fs: AbstractFileSystem, root: str, pruned: Callable[[str], bool]) -> dict[str, dict]:
    """What `fs.find(root, detail=True)` gives, from a walk of our own: fsspec's walk leaves out a
    folder it cannot list (sftp: its images then counted as deleted, their rows dropped) or
    ends the listing with the store's own error (an http folder that answers 403: a traceback,
    and --exclude could not help, as the walk entered it before any pattern applied). Here such a
    folder stops the run in one line naming it and the --exclude that leaves it out, and a
    folder the patterns leave out is not entered. (fsspec's ftp lists a folder it may not read
    as empty, which nothing here can tell from an empty folder.) Only what lies under a folder
    is followed: an http page linking to itself, or to a file or folder above it, is listed
    once (before, a RecursionError)."""
    found: dict[str, dict] = {}
    top = root.rstrip("/")
    seen = {top}
    tidy = _without_dot_segments if is_read_only(fs) else (lambda name: name)
    stack = [root]
    while stack:
        folder = stack.pop()
        base = folder.rstrip("/")
        try:
            listing = fs.ls(folder, detail=True)
        except Exception as err:  # noqa: BLE001 - each store has its own errors; connections are the run's
            if base == top or is_connection_error(err):
                raise
            if isinstance(err, FileNotFoundError) and not is_read_only(fs):
                continue  # vanished since its parent was read; on http, a 404 may hide a forbidden folder
            key = base[len(top):].lstrip("/")
            key = _unquoted(key) if is_read_only(fs) else key  # as the patterns see it
            status = _status(err)
            raise AeError(f"source folder {display_url(fs, folder)!r} cannot be listed ({type(err).__name__}: "
                          f"{_first_line(err)}); fix its permissions (or the link to it), or leave it out with --exclude "
                          f"{shlex.quote(_glob_escape(key) + '/*')}. Nothing was published: an unreadable folder "
                          "is never taken for deleted images",
                          transient=status is not None and (status == 429 or status >= 500)) from err
        under = base + "/" if base else ""
        for info in listing:
            info = {**info, "name": tidy(info["name"])}  # a page's "./" or "../loop/" is a folder already seen
            name = info["name"].rstrip("/")
            if not name.startswith(under):  # an http page's link to a file or folder elsewhere
                continue
            if info.get("type") != "directory":
                found[info["name"]] = info
            elif name not in seen and not pruned(name[len(top):].lstrip("/")):
                seen.add(name)
                stack.append(info["name"])
    return found


def _without_dot_segments(url: str) -> str:
    """`url` with its path's "." and ".." segments resolved (a listing page's links "./",
    "../here/" name the folder itself); a trailing "/" kept."""
    parts = urlsplit(url)
    if not re.search(r"(^|/)\.\.?(/|$)", parts.path):
        return url
    path = posixpath.normpath(parts.path) + ("/" if parts.path.endswith("/") else "")
    return urlunsplit(parts._replace(path=re.sub("^/+", "/", path)))  # normpath keeps a leading "//"


def _versions_of_unversioned(fs: AbstractFileSystem, paths: list[str]) -> dict[str, dict]:
    """An HTTP folder's listing is a page of links, with no size, date or ETag: one HEAD each
    (concurrent) gives them, so a file changed on the server is seen as changed (before, every
    file stayed "unchanged" forever, its embedding stale). Where even that fails the object gets
    a tag of its own each run (above): read again every run, never wrongly carried over."""
    if not paths:
        return {}
    if getattr(fs, "async_impl", False) and hasattr(fs, "_info"):
        from fsspec.asyn import _run_coros_in_chunks, sync

        async def heads() -> list:  # in chunks: not 100,000 requests at once
            return await _run_coros_in_chunks([fs._info(p) for p in paths], batch_size=64, return_exceptions=True)

        got = sync(fs.loop, heads)
    else:
        got = []
        for p in paths:
            try:
                got.append(fs.info(p))
            except Exception as err:  # noqa: BLE001 - its read reports it
                got.append(err)
    return {p: info for p, info in zip(paths, got) if isinstance(info, dict)}


def _may_include(folder: str, include: Sequence[str]) -> bool:
    """Whether some include pattern may match a key under `folder` (judged by each pattern's
    literal start, before its first wildcard); True without include patterns."""
    if not include:
        return True
    under = folder + "/"
    for pat in include:
        literal = re.split(r"[*?\[]", pat, maxsplit=1)[0]
        if literal.startswith(under) or under.startswith(literal):
            return True
    return False


def _left_out(folder: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether the patterns surely leave out every key under `folder` (a key relative to SOURCE):
    an exclude pattern ending in `*` whose rest matches `folder/` (then it matches every key
    there), or include patterns none of which can reach it. Before, one made-up key stood for
    them all, and `--exclude '*-*'` left out whole folders (that key was 'folder/-')."""
    under = folder + "/"
    return (any(pat.endswith("*") and _glob(under, pat[:-1]) for pat in exclude)
            or not _may_include(folder, include))


def _glob_escape(name: str) -> str:
    """`name` as a glob pattern that matches only itself (fnmatch reads [2019] as a class)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _walk_local(root: str, skip_prefix: str | None, exclude: Sequence[str] = (),
                include: Sequence[str] = ()) -> Iterator[tuple[str, int, str, str]]:
    """(path, size, tag, stat) of every file under a local `root`, folder by folder in sorted order:
    what `fs.walk(detail=True)` gives, from one `os.scandir` and one stat per entry instead of
    fsspec's per-entry `info` (~9 us each, as much as decoding a 28x28 PNG). Same values, but:
    a symlink's size is its target's, and its mtime the later of its own and its target's
    (fsspec gives its own only, so a target rewritten at the same size looked unchanged, and
    its embedding stale); a symlink to a folder is followed, unless it leads back into a folder
    it lies in (a loop) or into `skip_prefix` (OUTPUT, through a link); pipes, sockets and
    devices are left out (reading a pipe waits forever). Only small tuples are kept while a
    folder is read, not its DirEntry objects: a folder of 100,000 files held ~70 MB of them,
    which the allocator kept after the listing. Depth-first with a stack of its own: a tree
    1,000 folders deep is listed (recursion stopped at Python's limit)."""
    skip_real = os.path.realpath(skip_prefix) if skip_prefix else None
    top = root.rstrip("/") + "/"
    stack = [(root, frozenset([os.path.realpath(root)]))]  # (folder, the real paths of it and its parents)
    while stack:
        folder, ancestors = stack.pop()
        scanned = _scan_folder(folder, skip_prefix, skip_real, exclude, include, top)
        if scanned is None:
            continue
        files, subdirs = scanned
        yield from sorted(files)
        for sub in sorted(subdirs, reverse=True):  # popped in sorted order
            real = os.path.realpath(sub)
            if real not in ancestors and not (skip_real and _under(real, skip_real)):
                stack.append((sub, ancestors | {real}))


def _scan_folder(root: str, skip_prefix: str | None, skip_real: str | None, exclude: Sequence[str],
                 include: Sequence[str], top: str) -> tuple[list[tuple[str, int, str, str]], list[str]] | None:
    """One folder of _walk_local: its files and its subfolders, None when it is not to be listed."""
    base = root.rstrip("/")
    files: list[tuple[str, int, str, str]] = []
    subdirs: list[str] = []
    try:
        with os.scandir(root) as it:
            for entry in it:
                path = base + "/" + entry.name
                if skip_prefix and _under(path, skip_prefix):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(path)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since the scandir
                except OSError:  # cannot even stat it (no search permission): listed, so that
                    files.append((path, 0, "unstatable:size:0", ""))  # its read fails: a reject row
                    continue
                size, mtime, kind, ident = st.st_size, st.st_mtime, st.st_mode, f"{st.st_ino}:{st.st_ctime_ns}"
                if entry.is_symlink():
                    try:
                        target = entry.stat(follow_symlinks=True)
                        size, mtime, kind = target.st_size, max(mtime, target.st_mtime), target.st_mode
                        ident = f"{target.st_ino}:{target.st_ctime_ns}"
                    except OSError:  # dangling: listed, its read fails: a reject row
                        size, kind, ident = 0, stat.S_IFREG, ""
                    if stat.S_ISDIR(kind):
                        subdirs.append(path)
                        continue
                    if skip_real and _under(os.path.realpath(path), skip_real):
                        continue  # a file of OUTPUT's, through a link
                if not stat.S_ISREG(kind):
                    continue
                # fsspec's fields: `created` is what the tag falls back on for an mtime of 0
                files.append((path, size, listing_tag({"size": size, "mtime": mtime,
                                                       "created": getattr(st, "st_birthtime", st.st_ctime)}), ident))
    except (FileNotFoundError, NotADirectoryError):
        return None  # vanished since its parent was read: nothing of it to list
    except OSError as err:  # fsspec's walk skips it: its images were then counted as deleted, rows lost
        key = base[len(top):] if top and base.startswith(top) else ""
        if key and _left_out(key, include, exclude):
            return None  # left out by the user's patterns: its keys would not be listed anyway
        leave_out = (f"or leave it out with --exclude {shlex.quote(_glob_escape(key) + '/*')}" if key
                     else "or give a folder you may read")
        raise AeError(f"source folder {root!r} cannot be listed ({err.strerror or err}); fix its permissions, "
                      f"{leave_out}. Nothing was published: an unreadable folder is never taken for deleted "
                      "images", transient=err.errno not in (errno.EACCES, errno.EPERM)) from err
    return files, subdirs


def listing_tag(info: dict) -> str:
    """What the listing says about an object's version, without reading it."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return "etag:" + str(etag).strip('"')
    if info.get("CRC") is not None:  # a zip member: its checksum (a re-zipped member keeps size, loses mtime)
        return f"crc:{info['CRC']}:size:{info.get('size')}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("Last-Modified") or info.get("created") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size')}:mtime:{mtime}"


def unversioned(tag: str) -> bool:
    """A listing tag that tells nothing of the object's version: no size, date, ETag or
    checksum was listed (an HTTP page of links whose HEAD failed; http and zip objects before
    session 13 tagged them). Such an object is read again each run, not trusted as unchanged."""
    return tag.startswith("unknown:") or (tag.startswith("size:") and tag.endswith(":mtime:"))


_BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs")  # object stores whose paths start with a bucket
# where "user:secret@" would be read as part of the bucket's name (abfs://container@account is Azure's form)
_USERINFO_IS_BUCKET = ("s3", "s3a", "gs", "gcs")
_HOSTED = ("http", "https", "ftp", "ftps", "sftp", "ssh", "webdav", "dav", "davs", "smb", "hdfs", "webhdfs")  # user:password@host


def _protocol(fs: AbstractFileSystem) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def is_read_only(fs: AbstractFileSystem) -> bool:
    """An http(s) store (under any caching layer): fsspec reads it, and nothing can be written there."""
    return _protocol(underlying(fs)) in ("http", "https")


def is_connection_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(
        names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError",
                 "ReadTimeoutError", "ServerDisconnectedError", "ClientConnectionError", "ResponseStreamingError"})


def _where(fs: AbstractFileSystem) -> str:
    """' at <endpoint>' for an S3-compatible store with a custom endpoint, else ''."""
    endpoint = (getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
                or (os.environ.get("AWS_ENDPOINT_URL") if _protocol(fs) in ("s3", "s3a") else None))
    return f" at {endpoint}" if endpoint else ""


def _config_note(fs: AbstractFileSystem) -> str:
    """Where fsspec's configuration (FSSPEC_CONFIG_DIR) sets this store's endpoint or keys: a
    clause saying so, as it wins over the AWS_* variables (it is passed to s3fs as arguments,
    and botocore reads the environment only for what it is not given); else ''."""
    conf = fsspec.config.conf.get(_protocol(fs)) or {}
    endpoint = (conf.get("client_kwargs") or {}).get("endpoint_url") or conf.get("endpoint_url")
    in_force = (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url") or getattr(fs, "endpoint_url", None)
    given = getattr(fs, "storage_options", None) or {}  # what the store was made with, the file's included
    # only what is in force: a credentials block's own settings override the file's
    named = [name for name, there in (("endpoint", endpoint and endpoint == in_force),
                                      ("keys", conf.get("key") and conf.get("key") == given.get("key")),
                                      ("profile", conf.get("profile") and conf.get("profile") == given.get("profile")))
             if there]
    if not named:
        return ""
    where = os.environ.get("FSSPEC_CONFIG_DIR") or "~/.config/fsspec"
    return (f" (fsspec's configuration in {where} sets the {' and '.join(named)}, and wins over the AWS_* "
            "variables)")


def check_store(fs: AbstractFileSystem, root: str, url: str, role: str) -> None:
    """Touch the store once, writing nothing; failures become one line naming URL and fix.

    For object stores the bucket itself is checked: it must exist and be readable with the
    credentials in effect. Credentials never appear in the message.
    """
    bucket = root.split("/", 1)[0] if _protocol(fs) in _BUCKETED else None
    where = _where(fs) + _config_note(fs) if bucket else ""
    try:
        if bucket:
            fs.info(bucket)
        elif not is_local(fs):  # http(s), ftp, sftp...: reach the host once, so a dead one is one line
            fs.isdir(root)
    except FileNotFoundError as err:
        if not bucket:
            return  # reached it; the callers say what is missing
        raise AeError(f"{role} {url!r}: bucket {bucket!r} does not exist{where}; create it or fix "
                      "the URL") from err
    except PermissionError as err:
        if not bucket:
            raise AeError(f"{role} {url!r}: access denied ({_first_line(err)}); check the credentials "
                          "for that host") from err
        raise AeError(f"{role} {url!r}: access denied{where} ({err}); check the credentials "
                      "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the "
                      "bucket's policy") from err
    except Exception as err:
        if is_connection_error(err) or (not bucket and isinstance(err, OSError) and _status(err) is None):
            raise _unreachable(role, url, where, bucket is not None, err) from err
        if {cls.__name__ for cls in type(err).__mro__} & {"NoCredentialsError", "PartialCredentialsError"}:
            raise AeError(f"{role} {url!r}: no credentials found{where}; set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or name a Prefect block with "
                          "--aws-credentials-block") from err
        if not bucket:  # an HTTP error status, a refused login: one line; retried only where it may pass
            raise AeError(f"{role} {url!r} cannot be read ({type(err).__name__}: {_first_line(err)}); check "
                          "the URL, the host and the credentials", transient=_may_pass(err)) from err
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no detail"


def _unreachable(role: str, url: str, where: str, object_store: bool = True,
                 err: BaseException | None = None) -> AeError:
    fix = ("check the endpoint (AWS_ENDPOINT_URL, or the credentials block's endpoint_url) and the network"
           if object_store else "check the host name in the URL and the network")
    why = "" if object_store or err is None else f" ({type(err).__name__}: {_first_line(err)})"
    return AeError(f"{role} {url!r}: cannot reach the store{where}{why}; {fix}", transient=True)


def _status(err: BaseException) -> int | None:
    """The HTTP status of a failed request (aiohttp's, botocore's), or None."""
    status = getattr(err, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(err, "response", None)
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    return code if isinstance(code, int) else None


def _may_pass(err: BaseException) -> bool:
    """Worth a retry: throttling or a server error, not a refusal (4xx) or 501 Not Implemented."""
    status = _status(err)
    return status is None or status == 429 or (status >= 500 and status != 501)


def check_store_writable(fs: AbstractFileSystem, root: str, url: str, role: str) -> None:
    """An object store a run will write into and prune: a zero-byte test object is written under
    ROOT and deleted at once, so credentials that may read but not write (or not delete) fail
    before the work, not at the first write after training."""
    probe = join(root, f".ae-write-check-{uuid.uuid4().hex[:8]}")
    where = _where(fs)
    needs = " (s3:PutObject and s3:DeleteObject)" if _protocol(fs) in ("s3", "s3a") else ""
    for verb, act in (("write", lambda: fs.pipe_file(probe, b"")), ("delete", lambda: fs.rm_file(probe))):
        try:
            act()
        except PermissionError as err:
            left = f"; remove the test object {display_url(fs, probe)!r}" if verb == "delete" else ""
            raise AeError(f"{role} {url!r}: access denied when trying to {verb} an object there{where} "
                          f"({err}); the credentials need permission to write and delete objects under "
                          f"it{needs}{left}") from err
        except Exception as err:
            if is_connection_error(err):
                raise _unreachable(role, url, where, _protocol(fs) in _BUCKETED) from err
            # a store that takes no writes (a plain HTTP server answers PUT with 501), a quota
            raise AeError(f"{role} {url!r}: could not {verb} a test object there ({type(err).__name__}: "
                          f"{_first_line(err)}); give a local folder or an object store that these "
                          "credentials may write to, such as s3://bucket/prefix",
                          transient=_status(err) is not None and _may_pass(err)) from err


def check_local_writable(path: str, what: str) -> None:
    """A local folder that a run will create or write into: its nearest existing ancestor must
    be a folder where a file can be created (tried with a temporary file, removed at once), so a
    read-only or impossible path fails before the work, not at the first write after training."""
    try:  # os.path.exists says False for these too, and the parent passed the check
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):  # missing, or under a file: said below
        pass
    except OSError as err:  # a symbolic link loop, a name over 255 bytes
        raise AeError(f"{what} {path!r} cannot be used ({err.strerror or err}); give another path") from err
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise AeError(f"{what} {path!r}: {probe!r} is a file, so the folder cannot be created; give another path")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ae-write-check-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as err:
        raise AeError(f"{what} {path!r}: cannot write in {probe!r} ({err.strerror or err}); give a writable path") from err


def _under(path: str, prefix: str) -> bool:
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def read_many(fs: AbstractFileSystem, paths: Sequence[str]) -> dict[str, bytes | Exception]:
    """Fetch many objects in one call; async filesystems (s3fs) fetch them concurrently."""
    if not paths:
        return {}
    if is_local(fs) and not any("://" in p for p in paths):
        return _read_local(paths)
    # cat_ranges, not cat: cat expands glob characters, so a key with `[1]` in it read another
    # object or none. Whole objects: no start, no end.
    got = fs.cat_ranges(list(paths), None, None, on_error="return")
    return dict(zip(paths, got))


def read_heads(fs: AbstractFileSystem, paths: Sequence[str], n: int) -> dict[str, bytes | Exception]:
    """The first `n` bytes of each object (ranged reads, concurrent on async filesystems)."""
    if not paths:
        return {}
    if is_local(fs) and not any("://" in p for p in paths):
        return _read_local(paths, n)
    got = fs.cat_ranges(list(paths), [0] * len(paths), [n] * len(paths), on_error="return")
    return dict(zip(paths, got))


def _read_local(paths: Sequence[str], head: int | None = None) -> dict[str, bytes | Exception]:
    """Local files (or their first `head` bytes) straight through the OS: fsspec's local `cat`
    costs as much per call as decoding a tiny image (it normalises each path three times).
    Same result shape."""
    out: dict[str, bytes | Exception] = {}
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError as err:
            out[p] = err
            continue
        try:  # raw os.read: half the cost of open().read() on a 300-byte file
            if head is not None:
                out[p] = os.read(fd, head)  # a short read only shortens the sniffed head
                continue
            size = os.fstat(fd).st_size
            data = os.read(fd, size + 1)
            if len(data) != size:  # grew since its stat, or a short read (over 2 GiB, FUSE...)
                data += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            out[p] = data
        except OSError as err:
            out[p] = OSError(err.errno, err.strerror, p)  # os.read's errors do not name the file
        finally:
            os.close(fd)
    return out


def write_bytes_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name beside `path`, then move it into place."""
    _write_atomic(fs, path, lambda tmp: fs.pipe_file(tmp, data))


def put_file_atomic(fs: AbstractFileSystem, local_path: str, path: str) -> None:
    """Upload a finished local file; readers never see a partial object."""
    _write_atomic(fs, path, lambda tmp: fs.put_file(local_path, tmp))


def _write_atomic(fs: AbstractFileSystem, path: str, write: Callable[[str], object]) -> None:
    """`write` to a temporary name beside `path`, then the move; a failure removes the temporary
    (a full disk kept it, filling the disk further), and a full disk is one line."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    try:
        write(tmp)
        _move(fs, tmp, path)
    except BaseException as err:
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm_file(tmp)
        if out_of_space(err):
            raise no_space(err, display_url(fs, path), "choose an OUTPUT on a larger disk") from err
        raise


def out_of_space(err: BaseException) -> bool:
    """A full disk or quota; numpy's np.save says so without an errno ("N requested and M written")."""
    return isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT) or (
        err.errno is None and " requested and " in str(err) and str(err).endswith(" written")))


def no_space(err: BaseException, where: str, fix: str) -> AeError:
    why = getattr(err, "strerror", None) or f"a short write: {err}"
    return AeError(f"no space left on the disk holding {where!r} ({why}); free space there, or {fix}")


def _move(fs: AbstractFileSystem, src: str, dst: str) -> None:
    """A rename on a local disk; elsewhere a copy in the store and a delete, one object (what
    fs.mv does there, but fs.mv expands glob characters: an OUTPUT named `out [1]` failed)."""
    if is_local(fs):  # a rename (fs.mv would move the file into `dst` where `dst` is a folder)
        os.replace(fs._strip_protocol(src), fs._strip_protocol(dst))
    else:
        fs.cp_file(src, dst)
        fs.rm_file(src)


_GLOB_MAGIC = re.compile(r"[*?\[]")  # what fsspec's glob expansion reacts to


def remove_tree(fs: AbstractFileSystem, path: str) -> None:
    """Delete a folder and everything under it. fs.rm expands glob characters, so a folder
    whose path holds `[`, `*` or `?` is emptied object by object (found, not globbed)."""
    if is_local(fs) or not _GLOB_MAGIC.search(path):
        fs.rm(path, recursive=True)
        return
    for p in fs.find(path):
        fs.rm_file(p)
    with contextlib.suppress(OSError):  # a pseudo folder (memory://); S3 has none
        fs.rmdir(path)


def read_named_file(url: str, what: str, fix: str) -> bytes:
    """The bytes of one file a user named on the command line (`what`: "image", "labels file"),
    every failure one AeError: missing, a folder, a pipe or device (reading one would block), an
    unreachable store, missing credentials. `fix` ends the missing / not-a-file messages."""
    if not url.strip():  # before: open_store's "give a folder", for a file
        raise AeError(f"the {what} is an empty path; {fix}")
    fs, path = open_store(url)
    shown = redact_url(url)
    try:
        if is_local(fs) and fs.info(path)["type"] not in ("file", "directory"):
            raise AeError(f"{what} {shown!r} is not a regular file (a pipe, a device or a socket); {fix}")
        return fs.cat_file(path)
    except AeError:
        raise
    except FileNotFoundError as err:
        raise AeError(f"{what} {shown!r} not found; {fix}") from err
    except IsADirectoryError as err:
        raise AeError(f"{what} {shown!r} is a folder; {fix}") from err
    except Exception as err:  # noqa: BLE001 - unreachable host, credentials, permissions: one line
        raise AeError(f"{what} {shown!r} cannot be read ({type(err).__name__}: {err}); check the URL, "
                      "the endpoint and the credentials") from err


def read_text(fs: AbstractFileSystem, path: str) -> str:
    return fs.cat_file(path).decode("utf-8")


def fetch_to_local(url: str, local_dir: str) -> str:
    """Copy one object to a local folder (faiss and torch read local files) and return its path."""
    fs, path = open_store(url)
    if is_local(fs):
        return path
    dest = os.path.join(local_dir, posixpath.basename(path))
    fs.get_file(path, dest)
    return dest


def same_or_inside(fs_a: AbstractFileSystem, a: str, fs_b: AbstractFileSystem, b: str) -> bool:
    """True when location `a` is `b` or lies inside it, on the same filesystem. Local paths are
    compared resolved: through symlinks, and without `.` or `..` parts."""
    fs_a, fs_b = underlying(fs_a), underlying(fs_b)
    if type(fs_a) is not type(fs_b):
        return False
    if is_local(fs_a):
        a, b = os.path.realpath(a), os.path.realpath(b)
    return _under(a, b)


def underlying(fs: AbstractFileSystem) -> AbstractFileSystem:
    """The store under fsspec's caching layers (simplecache::, filecache::, blockcache::): the
    same paths, so OUTPUT in SOURCE is caught through a chained URL too."""
    from fsspec.implementations.cached import CachingFileSystem

    while isinstance(fs, CachingFileSystem):
        fs = fs.fs
    return fs


def iter_batches(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def redact_url(url: str) -> str:
    """Drop any user:password@ part of a URL (of each URL of a chain) before it is logged or stored."""
    if len(chain := _chain_parts(url)) > 1:
        return "::".join(redact_url(part) for part in chain)
    try:
        parts = urlsplit(url)
    except ValueError:  # a malformed host ("[::1" without its bracket): drop what stands before an @
        return re.sub(r"//[^/?#]*@", "//", url)
    if parts.username or parts.password:  # the host as written: [brackets] of IPv6 and case kept
        return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))
    return url


_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"?#]*@")


def redact_text(text: str) -> str:
    """A message with every URL's user:password@ dropped: the last guard before an error is
    printed, for the URLs a library's own error text quotes."""
    return _USERINFO.sub(r"\1", text)


__all__ = [
    "ObjectInfo", "redact_text", "open_store", "check_store", "listing_tag", "display_url", "join", "key_matches", "list_objects", "read_many",
    "write_bytes_atomic", "put_file_atomic", "read_text", "fetch_to_local", "same_or_inside",
    "iter_batches", "redact_url", "check_local_writable", "check_store_writable", "read_heads",
    "utf8_key", "key_path", "is_connection_error", "is_read_only",
]
