//! Where a catalog or an archive is, and reading it with a cap on its size. A catalog is a URL
//! (http or https) or a directory; an archive a catalog lists is a URL or, for a catalog in a
//! directory, a path inside that directory. A catalog served over HTTP cannot send kiln to read
//! local files.

use std::fmt;
use std::path::{Component, PathBuf};

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
                let shown = path.display();
                let meta = tokio::fs::metadata(path).await.map_err(|e| format!("{shown}: {e}"))?;
                if meta.len() > cap {
                    return Err(format!("{shown}: larger than {cap} bytes"));
                }
                tokio::fs::read(path).await.map_err(|e| format!("{shown}: {e}"))
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
