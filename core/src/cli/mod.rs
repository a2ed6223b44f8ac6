//! The command line besides `kiln serve`: the author's commands (`kiln new` writes a plugin
//! crate, `kiln check` builds and loads one as the server would; neither needs a server or a
//! database) and the commands for a running server (`remote`: status, plugins, reload, logs,
//! install, over its admin API).

pub mod check;
pub mod new;
pub mod remote;
