//! Where a catalog or an archive is, and reading it with a cap on its size. A catalog is a URL
//! (http or https) or a directory; an archive a catalog lists is a URL or, for a catalog in a
//! directory, a path inside that directory. A catalog served over HTTP cannot send kiln to read
//! local files.

use std::fmt;
use std::path::{Component, PathBuf};
use std::time::Duration;

/// How long reading a local catalog file may take.
const FILE_DEADLINE: Duration = Duration::from_secs(30);

/// A document to read: over HTTP, or from a local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Http(reqwest::Url),
    File(PathBuf),
}

impl Location {
    /// The `catalog.json` of a source: a URL (of the document itself if it ends in `.json`,
    /// else of the directory that serves it) or a local directory (or the document in it).
    pub fn parse(source: &str) -> Result<Self, String> {
        if is_http(source) {
            let mut url = reqwest::Url::parse(source).map_err(|e| format!("catalog URL {source:?}: {e}"))?;
            if !url.path().ends_with(".json") {
                if !url.path().ends_with('/') {
                    url.set_path(&format!("{}/", url.path()));
                }
                url = url.join("catalog.json").map_err(|e| e.to_string())?;
            }
            return Ok(Self::Http(url));
        }
        let path = PathBuf::from(source.strip_prefix("file://").unwrap_or(source));
        if !path.is_absolute() {
            return Err(format!("catalog {source:?}: use an http(s) URL or an absolute directory path"));
        }
        Ok(Self::File(if source.ends_with(".json") { path } else { path.join("catalog.json") }))
    }

    /// An archive as a synced entry records it (see [`Location::resolve`]).
    pub fn archive(recorded: &str) -> Self {
        match reqwest::Url::parse(recorded) {
            Ok(url) if is_http(recorded) => Self::Http(url),
            _ => Self::File(PathBuf::from(recorded)),
        }
    }

    /// `reference` (an archive's `url` in catalog.json), relative to this document.
    pub fn resolve(&self, reference: &str) -> Result<Self, String> {
        match self {
            Self::Http(base) => {
                let url = base.join(reference).map_err(|e| format!("url {reference:?}: {e}"))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!("url {reference:?}: a catalog served over HTTP lists http(s) archives only"));
                }
                Ok(Self::Http(url))
            }
            Self::File(_) if is_http(reference) => {
                reqwest::Url::parse(reference).map(Self::Http).map_err(|e| format!("url {reference:?}: {e}"))
            }
            Self::File(doc) => {
                let rel = std::path::Path::new(reference);
                if reference.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                    return Err(format!("url {reference:?}: a path inside the catalog's directory, or an http(s) URL"));
                }
                let dir = doc.parent().unwrap_or(doc);
                Ok(Self::File(dir.join(rel)))
            }
        }
    }

    /// Reads the whole document, refusing one larger than `cap` bytes.
    pub async fn fetch(&self, http: &reqwest::Client, cap: u64) -> Result<Vec<u8>, String> {
        match self {
            Self::Http(url) => {
                let mut response = http.get(url.clone()).send().await.map_err(|e| format!("GET {url}: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("GET {url}: HTTP {}", response.status()));
                }
                if response.content_length().is_some_and(|n| n > cap) {
                    return Err(format!("GET {url}: larger than {cap} bytes"));
                }
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.map_err(|e| format!("GET {url}: {e}"))? {
                    if (body.len() + chunk.len()) as u64 > cap {
                        return Err(format!("GET {url}: larger than {cap} bytes"));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
            Self::File(path) => {
                use tokio::io::AsyncReadExt;
                let shown = path.display();
                // A regular file only (a FIFO would block, a device never end), read under the cap
                // whatever its size said, within a deadline.
                let read = async {
                    let file = tokio::fs::File::open(path).await?;
                    if !file.metadata().await?.is_file() {
                        return Err(std::io::Error::other("not a regular file"));
                    }
                    let mut bytes = Vec::new();
                    file.take(cap + 1).read_to_end(&mut bytes).await?;
                    Ok(bytes)
                };
                let bytes = tokio::time::timeout(FILE_DEADLINE, read)
                    .await
                    .map_err(|_| format!("{shown}: not read within {} s", FILE_DEADLINE.as_secs()))?
                    .map_err(|e| format!("{shown}: {e}"))?;
                if bytes.len() as u64 > cap {
                    return Err(format!("{shown}: larger than {cap} bytes"));
                }
                Ok(bytes)
            }
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http(url) => write!(f, "{url}"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

fn is_http(s: &str) -> bool {
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_their_catalog_json() {
        let at = |s| Location::parse(s).unwrap().to_string();
        assert_eq!(at("http://h/cat"), "http://h/cat/catalog.json");
        assert_eq!(at("https://h/cat/"), "https://h/cat/catalog.json");
        assert_eq!(at("https://h/x/index.json"), "https://h/x/index.json");
        assert_eq!(at("/srv/cat"), "/srv/cat/catalog.json");
        assert_eq!(at("file:///srv/cat/catalog.json"), "/srv/cat/catalog.json");
        assert!(Location::parse("relative/dir").is_err());
        assert!(Location::parse("ftp://h/x").is_err());
    }

    #[tokio::test]
    async fn local_files_are_read_under_the_cap_and_only_if_regular() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.tar.gz");
        std::fs::write(&file, [1u8; 100]).unwrap();
        let http = reqwest::Client::new();
        let at = Location::File(file);
        assert_eq!(at.fetch(&http, 100).await.unwrap().len(), 100);
        assert!(at.fetch(&http, 99).await.unwrap_err().contains("larger than 99 bytes"));
        // A device says it is empty and never ends.
        let zero = Location::File("/dev/zero".into());
        assert!(zero.fetch(&http, 1 << 20).await.unwrap_err().contains("not a regular file"));
        assert!(Location::File(dir.path().join("none")).fetch(&http, 10).await.is_err());
    }

    #[test]
    fn archives_resolve_inside_their_catalog() {
        let http = Location::parse("http://h/cat/").unwrap();
        assert_eq!(http.resolve("a.tar.gz").unwrap().to_string(), "http://h/cat/a.tar.gz");
        assert_eq!(http.resolve("https://cdn/a.tar.gz").unwrap().to_string(), "https://cdn/a.tar.gz");
        assert!(http.resolve("file:///etc/passwd").is_err());
        let dir = Location::parse("/srv/cat").unwrap();
        assert_eq!(dir.resolve("v1/a.tar.gz").unwrap(), Location::File("/srv/cat/v1/a.tar.gz".into()));
        assert!(dir.resolve("../a.tar.gz").is_err());
        assert!(dir.resolve("/etc/passwd").is_err());
        assert_eq!(dir.resolve("http://h/a.tar.gz").unwrap().to_string(), "http://h/a.tar.gz");
        // As recorded, and read back.
        assert_eq!(Location::archive("http://h/cat/a.tar.gz"), http.resolve("a.tar.gz").unwrap());
        assert_eq!(Location::archive("/srv/cat/v1/a.tar.gz"), dir.resolve("v1/a.tar.gz").unwrap());
    }
}
