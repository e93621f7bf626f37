//! What podtrace reads about the running kernel before loading its programs: struct offsets
//! and enum names from BTF (`btf`), tracepoint record layouts from tracefs (`tracefs`), the
//! `KernelLayout` built from both (`layout`), and function names for drop locations
//! (`symbols`).

pub mod btf;
pub mod layout;
pub mod symbols;
pub mod tracefs;
