//! The subcommands of the `kvstore` binary, one module per group.

pub(crate) mod serve;
