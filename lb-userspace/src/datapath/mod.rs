//! The maps, as the last stage of a change: how much they hold (`capacity`), their primitives
//! (`maps`, implemented by the pinned BPF maps in `pinned`, whose large arrays `mapped` maps
//! into memory), what they hold now (`installed`), the operations that change them (`ops`)
//! and applying those (`apply`), the ids and slot ranges free (`free`), what is installed
//! kept in memory between reconciles (`mirror`), the diff from what is installed to the plan
//! (`reconcile`), the socket iterators (`iter`, reading kernel structs at offsets from
//! `btf_offsets`), ending the sockets of removed backends (`terminate`), surveying and
//! closing idle connections (`survey`), and what a socket's state costs the kernel
//! (`socket_memory`, from the same type information).

pub mod capacity;
pub mod maps;
pub mod installed;
pub mod ops;
pub mod apply;
pub mod free;
pub mod mirror;
pub mod reconcile;
pub mod sys;
pub mod btf_offsets;
pub mod socket_memory;
pub mod iter;
pub mod terminate;
pub mod survey;
pub mod mapped;
pub mod pinned;
