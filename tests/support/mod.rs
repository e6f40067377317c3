pub mod alloc;
pub mod random;
