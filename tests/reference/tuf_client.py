"""The reference TUF client (python-tuf's ngclient) against a live fleet.

Given only the pinned root.json and the repository's two URLs, it refreshes
the metadata (walking every root version, checking every signature, hash,
version and expiry the way the TUF specification says) and downloads and
verifies every target. Prints one JSON object: the versions it trusted and,
per target, its length, SHA-256 and custom fields.

Usage: tuf_client.py ROOT_JSON METADATA_URL TARGETS_URL WORK_DIR
Exit status 0 on success; on any failure python-tuf's error is printed and
the status is 1.
"""

import hashlib
import json
import os
import shutil
import sys

from tuf.ngclient import Updater


def main() -> int:
    root_json, metadata_url, targets_url, work = sys.argv[1:5]
    metadata_dir = os.path.join(work, "metadata")
    download_dir = os.path.join(work, "downloads")
    os.makedirs(metadata_dir, exist_ok=True)
    os.makedirs(download_dir, exist_ok=True)
    # ngclient starts from root.json in its metadata directory.
    if not os.path.exists(os.path.join(metadata_dir, "root.json")):
        shutil.copy(root_json, os.path.join(metadata_dir, "root.json"))
    updater = Updater(
        metadata_dir=metadata_dir,
        metadata_base_url=metadata_url,
        target_base_url=targets_url,
        target_dir=download_dir,
        # The trusted root is the one in metadata_dir: the pinned root.json
        # at first, then the newest root this client verified.
        bootstrap=None,
    )
    try:
        updater.refresh()
        trusted = updater._trusted_set  # versions only, for the report
        report = {
            "root": trusted.root.version,
            "timestamp": trusted.timestamp.version,
            "snapshot": trusted.snapshot.version,
            "targets": trusted.targets.version,
            "files": {},
        }
        for name in sorted(trusted.targets.targets):
            info = updater.get_targetinfo(name)
            path = updater.download_target(info)
            with open(path, "rb") as f:
                data = f.read()
            report["files"][name] = {
                "length": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "custom": info.custom,
            }
    except Exception as e:  # every python-tuf refusal, reported as such
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
