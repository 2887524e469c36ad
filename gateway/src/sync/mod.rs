//! Fan-out: the subscriber registry, the log follower that publishes commits in seq order,
//! the in-memory catch-up tail ([`hub`]), and what each subscriber is sent — deliverability
//! under a filter and frames cut to a byte budget ([`frames`], pure).

#[doc(hidden)]
pub mod bench;
pub(crate) mod frames;
pub(crate) mod hub;
