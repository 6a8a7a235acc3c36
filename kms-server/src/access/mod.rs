//! The access layer: who a caller is (identity → tenant and role), whether it is locked
//! out, what waits for other operators' approval, and how fast it may unwrap.

pub mod approvals;
pub mod brake;
pub mod lockout;
pub mod policy;
