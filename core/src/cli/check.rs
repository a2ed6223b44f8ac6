//! `kiln check DIR`: builds a plugin crate as the server would (kiln's copy of kiln-types,
//! panics that unwind, a release cdylib), loads it, and prints what it would serve, or the
//! compiler's diagnostics, or why it would not load.

use crate::compiler::{BuildError, Compiler};
use crate::loader::LoadedPlugin;
use crate::manifest::Manifest;
use std::path::PathBuf;

/// What `kiln check` needs.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The plugin crate's directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// The configuration to load it with (JSON).
    #[arg(long, default_value = "{}")]
    pub config: String,
    /// Where cargo builds (default: `target/kiln` in the crate).
    #[arg(long, env = "KILN_BUILD_DIR")]
    pub build_dir: Option<PathBuf>,
    /// How plugins are built (as `kiln serve` takes it).
    #[arg(long, env = "KILN_BUILD_PROFILE", value_enum, default_value = "staged")]
    pub build_profile: crate::compiler::BuildProfile,
    /// The kiln-types sources plugins are built against.
    #[arg(long, env = "KILN_TYPES_DIR", default_value = crate::config::DEFAULT_TYPES_DIR)]
    pub types_dir: PathBuf,
    /// Also keep the library in the crate (`.kiln-prebuilt/`), so that a server with the same
    /// kiln-types and build profile loads it without compiling while the sources stay as they are.
    #[arg(long)]
    pub write_prebuilt: bool,
}

/// Why the check failed: what the author must fix.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("the library does not load: {0}")]
    Load(#[from] crate::loader::LoadError),
    #[error("{0}")]
    Routes(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What a successful check found.
#[derive(Debug)]
pub struct Checked {
    pub library: PathBuf,
    /// Whether cargo ran (not: the library of these sources existed).
    pub built: bool,
    pub duration: std::time::Duration,
    pub description: kiln_types::PluginDescription,
    /// The prebuilt library's stamp, when asked to write one.
    pub prebuilt: Option<PathBuf>,
}

/// Builds and loads the crate at `args.dir`.
pub async fn check(args: &CheckArgs) -> Result<Checked, CheckError> {
    // Absolute: cargo names the crate of each artifact by its absolute manifest path.
    let manifest = Manifest::read_off_worker(&std::path::absolute(&args.dir)?).await?;
    let build_dir = args.build_dir.clone().unwrap_or_else(|| manifest.dir.join("target/kiln"));
    let build_dir = std::path::absolute(build_dir)?;
    // The server's build directory works too (`--build-dir`, as `kiln serve` takes it): its
    // dependencies are built already.
    let compiler =
        Compiler::new(build_dir.clone(), build_dir.join("kiln-check"), args.types_dir.clone(), args.build_profile)?;
    let hash = compiler.source_hash(&manifest).await?;
    let artifact = compiler.build(&manifest, &hash).await?;
    let (library, config) = (artifact.path.clone(), args.config.clone().into_bytes());
    let loaded = tokio::task::spawn_blocking(move || LoadedPlugin::load(&library, &config))
        .await
        .map_err(std::io::Error::other)??;
    let description = loaded.description().clone();
    tokio::task::spawn_blocking(move || loaded.retire_now()).await.map_err(std::io::Error::other)?;
    if description.name != manifest.name {
        return Err(CheckError::Routes(format!(
            "the library calls itself {:?}, the manifest {:?}",
            description.name, manifest.name
        )));
    }
    crate::routes::own_patterns(&description.routes).map_err(|e| match e {
        crate::routes::RouteProblem::Invalid(why) => CheckError::Routes(format!("InvalidRoute: {why}")),
        crate::routes::RouteProblem::Conflict(why) => CheckError::Routes(format!("RouteConflict: {why}")),
    })?;
    let prebuilt = if args.write_prebuilt {
        let (dir, name, library) = (manifest.dir.clone(), manifest.name.clone(), artifact.path.clone());
        let written = tokio::task::spawn_blocking(move || crate::prebuilt::write(&dir, &name, &hash, &library));
        Some(written.await.map_err(std::io::Error::other)??)
    } else {
        None
    };
    Ok(Checked { library: artifact.path, built: artifact.built, duration: artifact.duration, description, prebuilt })
}

/// The report `kiln check` prints for a plugin that would serve.
pub fn report(checked: &Checked) -> String {
    let d = &checked.description;
    let mut out = format!("{} {}: builds and loads", d.name, d.version);
    if checked.built {
        out.push_str(&format!(" (built in {:.1} s)", checked.duration.as_secs_f64()));
    }
    out.push_str(&format!("\n  library {}\n", checked.library.display()));
    if let Some(stamp) = &checked.prebuilt {
        out.push_str(&format!("  prebuilt {}\n", stamp.display()));
    }
    let width = d.routes.iter().map(|r| r.method.len() + r.path.len() + 1).max().unwrap_or(0);
    for r in &d.routes {
        let route = format!("{} {}", r.method, r.path);
        let summary = if r.summary.is_empty() { String::new() } else { format!("  {}", r.summary) };
        out.push_str(&format!("  route {route:width$}{summary}\n"));
    }
    for s in &d.subscriptions {
        out.push_str(&format!("  event {} -> {}\n", s.pattern, s.handler));
    }
    for s in &d.services {
        out.push_str(&format!("  service {}\n", s.name));
    }
    out
}
