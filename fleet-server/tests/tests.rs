//! Tests of the fleet's storage against real databases: SQLite in a temporary
//! directory and PostgreSQL on 127.0.0.1:5432 (database `test`, a fresh
//! database per test). The same tests run on both. `updates` checks the TUF
//! repository with tough's own client and the model registry.

mod storage;
mod updates;
