//! Empty on purpose: lb-user's build.rs depends on this library target so that cargo rebuilds the
//! XDP object when this crate changes. The program itself is the `lb` binary (src/main.rs).
#![no_std]
