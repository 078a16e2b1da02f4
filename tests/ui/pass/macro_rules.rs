//! Handlers written by a `macro_rules!`: the event's name may come from the macro's caller or
//! from the macro itself, and the body still sees it (macro hygiene keeps the two apart).
use deferred_core::deferred_handler;
use lambda_runtime::{Context, LambdaEvent};

// The name comes from the caller, the attribute from the macro.
macro_rules! handler_named {
    ($name:ident, $event:ident) => {
        #[deferred_handler]
        async fn $name($event: LambdaEvent<u8>) -> u8 {
            $event.payload + 1
        }
    };
}

// Every name is the macro's own, underscore-prefixed or not.
macro_rules! handler_own {
    ($name:ident, $underscored:ident) => {
        #[deferred_handler]
        async fn $name(mut event: LambdaEvent<u8>) -> u8 {
            event.payload += 2;
            event.payload
        }

        #[deferred_handler]
        async fn $underscored(_event: LambdaEvent<u8>) -> u8 {
            _event.payload + 3
        }
    };
}

// A type that a macro expands to `impl Trait`.
macro_rules! debug_payload {
    () => { impl ::core::fmt::Debug };
}

#[deferred_handler]
async fn type_macro(event: LambdaEvent<debug_payload!()>) -> String {
    format!("{:?}", event.payload)
}

// The same macro for the return type: the attribute cannot see what it expands to.
#[deferred_handler]
async fn type_macro_return(event: LambdaEvent<u8>) -> debug_payload!() {
    event.payload
}

#[deferred_handler]
async fn type_macro_in_result(
    event: LambdaEvent<u8>,
) -> Result<debug_payload!(), lambda_runtime::Error> {
    let n: u8 = "2".parse()?;
    Ok(event.payload + n)
}

handler_named!(named, event);
handler_named!(underscored, _event);
handler_own!(own, own_underscored);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let event = || LambdaEvent::new(1, Context::default());
    assert_eq!(named(event()).await, 2);
    assert_eq!(underscored(event()).await, 2);
    assert_eq!(own(event()).await, 3);
    assert_eq!(own_underscored(event()).await, 4);
    assert_eq!(type_macro(event()).await, "1");
    assert_eq!(format!("{:?}", type_macro_return(event()).await), "1");
    assert_eq!(
        format!("{:?}", type_macro_in_result(event()).await.unwrap()),
        "3"
    );
}
