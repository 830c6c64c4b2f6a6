//! OTP-grade supervision trees for tokio tasks (work in progress).
