//! Small things every floor uses.

/// Runs its closure when dropped, also while unwinding from a PostgreSQL error: for backend
/// flags that must not outlive the call that set them.
pub struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
