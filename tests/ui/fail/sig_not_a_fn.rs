use deferred_core::deferred_handler;

#[deferred_handler]
struct Handler {
    name: String,
}

#[deferred_handler]
impl Handler {
    fn name(&self) -> &str {
        &self.name
    }
}

fn main() {}
