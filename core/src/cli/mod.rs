//! The author's commands: `kiln new` writes a plugin crate, `kiln check` builds and loads one
//! as the server would. Neither needs a server or a database.

pub mod check;
pub mod new;
