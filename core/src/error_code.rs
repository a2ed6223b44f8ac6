//! Every error code kiln answers with or writes on a plugin's row, in one place: its name, its
//! HTTP status, and what it means. The README's table of codes is checked against [`ALL`] by a
//! test, so the two cannot drift.

use std::fmt;

/// A stable, machine-readable error code (`{"error": "<code>", …}`, and the prefix of a row's
/// `error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    InvalidName,
    InvalidArchive,
    Unauthorized,
    PluginNotFound,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PluginExists,
    NotInCatalog,
    LengthRequired,
    TooLarge,
    BodyTooLarge,
    UriTooLong,
    UnsupportedMediaType,
    ManifestNotFound,
    InvalidManifest,
    BuildFailed,
    AbiMismatch,
    EntrypointNotFound,
    LoadError,
    InitFailed,
    CrashedDuringLoad,
    CrashLoop,
    RouteConflict,
    DependencyMissing,
    DependencyCycle,
    InvalidRoute,
    InvalidConfig,
    InvalidResources,
    MigrationFailed,
    InvalidEvent,
    PluginInactive,
    DatabaseRefused,
    TableAccessDenied,
    TopicReserved,
    DependencyNotDeclared,
    QueryFailed,
    PluginError,
    PluginCrashed,
    MemoryLimit,
    CpuLimit,
    ChecksumMismatch,
    SignatureInvalid,
    CatalogMismatch,
    CatalogUnavailable,
    Internal,
    DatabaseError,
    DatabaseUnavailable,
    DependencyUnavailable,
    PluginOverloaded,
    Timeout,
}

/// Every code, in the README's order.
pub const ALL: &[ErrorCode] = &[
    ErrorCode::BadRequest,
    ErrorCode::InvalidName,
    ErrorCode::InvalidArchive,
    ErrorCode::Unauthorized,
    ErrorCode::TableAccessDenied,
    ErrorCode::TopicReserved,
    ErrorCode::DependencyNotDeclared,
    ErrorCode::PluginNotFound,
    ErrorCode::NotInCatalog,
    ErrorCode::NotFound,
    ErrorCode::MethodNotAllowed,
    ErrorCode::RequestTimeout,
    ErrorCode::PluginExists,
    ErrorCode::LengthRequired,
    ErrorCode::TooLarge,
    ErrorCode::BodyTooLarge,
    ErrorCode::UriTooLong,
    ErrorCode::UnsupportedMediaType,
    ErrorCode::ManifestNotFound,
    ErrorCode::InvalidManifest,
    ErrorCode::BuildFailed,
    ErrorCode::AbiMismatch,
    ErrorCode::EntrypointNotFound,
    ErrorCode::LoadError,
    ErrorCode::InitFailed,
    ErrorCode::CrashedDuringLoad,
    ErrorCode::CrashLoop,
    ErrorCode::ChecksumMismatch,
    ErrorCode::SignatureInvalid,
    ErrorCode::CatalogMismatch,
    ErrorCode::RouteConflict,
    ErrorCode::DependencyMissing,
    ErrorCode::DependencyCycle,
    ErrorCode::InvalidRoute,
    ErrorCode::InvalidConfig,
    ErrorCode::InvalidResources,
    ErrorCode::MigrationFailed,
    ErrorCode::InvalidEvent,
    ErrorCode::PluginInactive,
    ErrorCode::DatabaseRefused,
    ErrorCode::QueryFailed,
    ErrorCode::PluginError,
    ErrorCode::Internal,
    ErrorCode::DatabaseError,
    ErrorCode::PluginCrashed,
    ErrorCode::MemoryLimit,
    ErrorCode::CpuLimit,
    ErrorCode::CatalogUnavailable,
    ErrorCode::DatabaseUnavailable,
    ErrorCode::DependencyUnavailable,
    ErrorCode::PluginOverloaded,
    ErrorCode::Timeout,
];

impl ErrorCode {
    /// The code as it appears in answers and rows.
    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    /// The HTTP status an answer with this code has.
    pub fn status(self) -> u16 {
        self.entry().1
    }

    /// What the code means, for the README and the OpenAPI document.
    pub fn meaning(self) -> &'static str {
        self.entry().2
    }

    fn entry(self) -> (&'static str, u16, &'static str) {
        use ErrorCode::*;
        match self {
            BadRequest => ("BadRequest", 400, "a malformed request: a parameter or body that does not parse"),
            InvalidName => (
                "InvalidName",
                400,
                "a name outside 1–64 of `A-Z a-z 0-9 _ -` starting with a letter or digit (names become paths and library names)",
            ),
            InvalidArchive => (
                "InvalidArchive",
                400,
                "an upload that is not a safe `.tar.gz` of a plugin crate (absolute or `..` paths, links, devices, too many or too large files)",
            ),
            Unauthorized => ("Unauthorized", 401, "`KILN_ADMIN_TOKEN` is set and the bearer token is missing or wrong"),
            PluginNotFound => ("PluginNotFound", 404, "no plugin of that name"),
            NotFound => ("NotFound", 404, "no admin endpoint and no plugin route for this path"),
            MethodNotAllowed => ("MethodNotAllowed", 405, "the path exists with other methods, named in `Allow`"),
            RequestTimeout => {
                ("RequestTimeout", 408, "a request body that stopped arriving (`--request-timeout-secs`)")
            }
            PluginExists => (
                "PluginExists",
                409,
                "an upload whose plugin name is taken; a catalog install over a plugin that was not installed from an archive",
            ),
            NotInCatalog => ("NotInCatalog", 404, "no synced catalog entry of that name (and version)"),
            LengthRequired => ("LengthRequired", 411, "an upload without a Content-Length"),
            TooLarge => ("TooLarge", 413, "an upload over 32 MiB"),
            BodyTooLarge => (
                "BodyTooLarge",
                413,
                "a request body over the limit (`--max-body` for plugins, 1 MiB for the admin API), refused before it is read",
            ),
            UriTooLong => ("UriTooLong", 414, "a request line over 16 KiB (a long query string belongs in a body)"),
            UnsupportedMediaType => ("UnsupportedMediaType", 415, "a body without the content type the endpoint takes"),
            ManifestNotFound => ("ManifestNotFound", 422, "no `Cargo.toml` at the plugin's `source_path`"),
            InvalidManifest => (
                "InvalidManifest",
                422,
                "a `Cargo.toml` without `[package.metadata.kiln]`, an unusable one, or one that cannot be read",
            ),
            BuildFailed => ("BuildFailed", 422, "cargo failed; the message holds the compiler's diagnostics"),
            AbiMismatch => ("AbiMismatch", 422, "the library speaks another kiln-types ABI (both versions named)"),
            EntrypointNotFound => ("EntrypointNotFound", 422, "the library lacks an export of `export_plugin!`"),
            LoadError => ("LoadError", 422, "the library does not open, or describes itself unreadably"),
            InitFailed => ("InitFailed", 422, "the plugin's `init` returned an error or panicked"),
            CrashedDuringLoad => (
                "CrashedDuringLoad",
                422,
                "this version took the server down while loading (how: signal or exit code); it is skipped until the row or the source changes",
            ),
            CrashLoop => (
                "CrashLoop",
                422,
                "an isolated plugin's process crashed 5 times within 60 s (the last crash is named): it is not restarted until the row or the source changes",
            ),
            RouteConflict => (
                "RouteConflict",
                422,
                "a path an older plugin or the admin API owns; the plugin waits and takes it when it is freed",
            ),
            DependencyMissing => (
                "DependencyMissing",
                422,
                "a plugin it depends on (`dependencies` in its manifest) does not serve, or not in a version that will do: it waits (`waiting`) and loads by itself once that one serves",
            ),
            DependencyCycle => (
                "DependencyCycle",
                422,
                "its dependencies lead back to it; the message names the cycle (`a → b → a`), and every plugin in it fails",
            ),
            InvalidRoute => ("InvalidRoute", 422, "a malformed route, or one declared twice"),
            InvalidConfig => (
                "InvalidConfig",
                422,
                "a config that does not match the plugin's schema (`details.violations` lists each `path` and `message`), or that its `configure` hook refused",
            ),
            InvalidResources => (
                "InvalidResources",
                422,
                "a row's `resources` that kiln cannot apply: an unknown key, a table that is not `schema.table`, a grant PostgreSQL refuses",
            ),
            MigrationFailed => (
                "MigrationFailed",
                422,
                "a plugin migration failed (PostgreSQL's message), changed after it was applied, or left a declared table missing",
            ),
            InvalidEvent => (
                "InvalidEvent",
                422,
                "an event kiln refuses: a topic that is not dot-separated segments of letters, digits, `_` and `-`, a `kiln.` topic from a plugin or PostgreSQL, data over 1 MiB; or a bad topic pattern",
            ),
            PluginInactive => ("PluginInactive", 422, "the plugin's row is `inactive`, so there is nothing to reload"),
            DatabaseRefused => (
                "DatabaseRefused",
                422,
                "PostgreSQL refused the data (for example `\\u0000` in JSON); its message and constraint are kept",
            ),
            TableAccessDenied => (
                "TableAccessDenied",
                403,
                "PostgreSQL refused a plugin's query: its role has no right to that table (plugins reach only their own schema and what `resources` grants)",
            ),
            TopicReserved => ("TopicReserved", 403, "an event under `kiln.`, which only kiln publishes"),
            DependencyNotDeclared => (
                "DependencyNotDeclared",
                403,
                "to a plugin: it called a service of a plugin its manifest's `dependencies` does not name",
            ),
            QueryFailed => (
                "QueryFailed",
                422,
                "PostgreSQL refused a plugin's query for another reason (its SQLSTATE and message are kept)",
            ),
            PluginError => ("PluginError", 500, "a plugin handler panicked or answered something invalid"),
            PluginCrashed => (
                "PluginCrashed",
                502,
                "an isolated plugin's process died (signal or exit code named) with the request in it, or is being restarted",
            ),
            MemoryLimit => {
                ("MemoryLimit", 502, "an isolated plugin's process ran out of its memory limit (it is restarted)")
            }
            CpuLimit => ("CpuLimit", 502, "an isolated plugin's process used up its CPU-time limit (it is restarted)"),
            ChecksumMismatch => (
                "ChecksumMismatch",
                422,
                "a catalog archive whose sha256 is not the one its entry lists (both named); nothing is installed",
            ),
            SignatureInvalid => (
                "SignatureInvalid",
                422,
                "trusted keys are configured and the catalog entry is unsigned, or not signed by any of them; nothing is installed",
            ),
            CatalogMismatch => (
                "CatalogMismatch",
                422,
                "a catalog archive whose manifest names another plugin or version than its entry; nothing is installed",
            ),
            CatalogUnavailable => (
                "CatalogUnavailable",
                502,
                "a catalog archive could not be downloaded (the URL and the failure are named)",
            ),
            Internal => ("Internal", 500, "a failure inside kiln; the log has the details"),
            DatabaseError => ("DatabaseError", 500, "PostgreSQL refused a statement for a reason other than the data"),
            DatabaseUnavailable => ("DatabaseUnavailable", 503, "PostgreSQL cannot be reached (plugins keep serving)"),
            DependencyUnavailable => (
                "DependencyUnavailable",
                503,
                "to a plugin: it called a service of a dependency that does not serve now (inactive, failed, or being replaced)",
            ),
            PluginOverloaded => (
                "PluginOverloaded",
                503,
                "the plugin's blocking routes (`--blocking-calls-per-plugin`, 64), or all plugins' together (`--blocking-calls`, 256), ran as many calls as they may, hung or slow, each holding a thread of the server's blocking pool, until this call's deadline: its handler was not run (`Retry-After: 1`)",
            ),
            Timeout => (
                "Timeout",
                504,
                "a plugin handler ran past its route's deadline (its answer, if any, is dropped); to a plugin: a host call after the deadline, or a statement PostgreSQL cancelled at it",
            ),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&crate::repo::RepoError> for ErrorCode {
    fn from(e: &crate::repo::RepoError) -> Self {
        match e {
            crate::repo::RepoError::Unavailable(_) => ErrorCode::DatabaseUnavailable,
            refused if refused.is_bad_input() => ErrorCode::DatabaseRefused,
            crate::repo::RepoError::Refused { .. } => ErrorCode::DatabaseError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's table of codes is this table: every code once, with its status and meaning.
    #[test]
    fn the_readme_table_is_this_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let table =
            readme.split_once("| Code | Status | Meaning |\n|---|---|---|\n").expect("the README's error table").1;
        let documented: Vec<String> = table.lines().take_while(|l| l.starts_with('|')).map(str::to_string).collect();
        let expected: Vec<String> =
            ALL.iter().map(|c| format!("| `{}` | {} | {} |", c.as_str(), c.status(), c.meaning())).collect();
        assert_eq!(documented, expected, "the README's error table differs from core/src/error_code.rs");
    }

    #[test]
    fn every_code_is_listed_once_and_names_itself() {
        for (i, c) in ALL.iter().enumerate() {
            assert_eq!(format!("{c:?}"), c.as_str());
            assert!(!ALL[..i].contains(c), "{c} twice");
        }
    }
}
