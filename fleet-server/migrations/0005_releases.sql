-- Daemon releases: rxvisiond binaries pushed by admins, stored under the
-- artifacts directory by SHA-256 and published as TUF targets of kind
-- daemon (<target> = rxvisiond-<version>-<arch>). state: available,
-- deploying (to `percent` % of devices by cohort bucket), production,
-- halted, retired (releases::ReleaseState).
CREATE TABLE daemon_releases (
    version TEXT NOT NULL,
    arch TEXT NOT NULL,
    state TEXT NOT NULL,
    percent BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    target TEXT NOT NULL UNIQUE,
    state_reason TEXT NOT NULL,
    pushed_ms BIGINT NOT NULL,
    pushed_by TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (version, arch)
);
