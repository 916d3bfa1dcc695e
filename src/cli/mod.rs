//! The command line: its flags ([`args`]), the values users type
//! ([`values`]), config files ([`file`], [`keys`], merged by [`load`]) and
//! the effective configuration printed back ([`print`]).

pub(crate) mod args;
pub(crate) mod file;
pub(crate) mod keys;
pub(crate) mod load;
pub(crate) mod print;
pub(crate) mod values;

pub(crate) use args::{Command, EchoArgs, ExposeArgs, ServeArgs};
pub(crate) use load::{LoadError, load};
