//! The idempotency key: created by the producer, checked by the ledger.

use std::fmt;

/// A validated idempotency key.
///
/// The producer creates it (a payment id, an order id, a message id) and every copy of the same
/// logical message carries the same key. The ledger stores it per consumer; a second delivery with
/// the same key finds it there and is acknowledged without running the handler.
///
/// A key is 1 to [`Key::MAX_LEN`] bytes of UTF-8 without control characters, so it can be logged,
/// stored and put in an AMQP header as it is.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    /// Longest key accepted, in bytes. Longer keys are a producer bug (a body pasted into a key),
    /// not an identifier, and they bloat the ledger's primary-key index.
    pub const MAX_LEN: usize = 200;

    /// Validates `value` as a key.
    pub fn new(value: impl Into<String>) -> Result<Self, KeyError> {
        let value = value.into();
        if value.is_empty() {
            return Err(KeyError::Empty);
        }
        if value.len() > Self::MAX_LEN {
            return Err(KeyError::TooLong { len: value.len() });
        }
        if let Some(position) = value.chars().position(char::is_control) {
            return Err(KeyError::ControlCharacter { position });
        }
        Ok(Self(value))
    }

    /// The key as text, exactly as stored in the ledger.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Key {
    type Error = KeyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;
    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<uuid::Uuid> for Key {
    fn from(value: uuid::Uuid) -> Self {
        // A hyphenated UUID is 36 ASCII bytes: always a valid key.
        Self(value.hyphenated().to_string())
    }
}

/// Why a value is not a valid [`Key`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is the empty string.
    #[error("the idempotency key is empty; the producer must set a unique, stable key")]
    Empty,
    /// The key is longer than [`Key::MAX_LEN`].
    #[error("the idempotency key is {len} bytes long; at most {max} are allowed", max = Key::MAX_LEN)]
    TooLong {
        /// Length of the rejected key in bytes.
        len: usize,
    },
    /// The key contains a control character.
    #[error("the idempotency key contains a control character at position {position}")]
    ControlCharacter {
        /// Character index of the first control character.
        position: usize,
    },
    /// The message has no key field and the transport carried no message id.
    #[error("the message has no idempotency key: it has no key field and no AMQP message_id")]
    Missing,
}

/// A field type that can serve as a message's idempotency key (`#[idem(key)]`).
///
/// Implemented for [`uuid::Uuid`], `String`, `&str` and the integer types. `Option<T>` turns
/// `None` into [`KeyError::Missing`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an idempotency key",
    label = "this field is marked #[idem(key)]",
    note = "use a Uuid, a String or an integer field as the key"
)]
pub trait KeyField {
    /// The key this field's value stands for.
    fn to_key(&self) -> Result<Key, KeyError>;
}

impl KeyField for uuid::Uuid {
    fn to_key(&self) -> Result<Key, KeyError> {
        Ok(Key::from(*self))
    }
}

impl KeyField for String {
    fn to_key(&self) -> Result<Key, KeyError> {
        Key::new(self.as_str())
    }
}

impl KeyField for str {
    fn to_key(&self) -> Result<Key, KeyError> {
        Key::new(self)
    }
}

impl<T: KeyField + ?Sized> KeyField for &T {
    fn to_key(&self) -> Result<Key, KeyError> {
        (**self).to_key()
    }
}

impl<T: KeyField> KeyField for Option<T> {
    fn to_key(&self) -> Result<Key, KeyError> {
        self.as_ref().ok_or(KeyError::Missing)?.to_key()
    }
}

macro_rules! integer_key_fields {
    ($($t:ty),*) => {$(
        impl KeyField for $t {
            fn to_key(&self) -> Result<Key, KeyError> {
                Ok(Key(self.to_string()))
            }
        }
    )*};
}
integer_key_fields!(i16, i32, i64, i128, u16, u32, u64, u128);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_cannot_be_a_key() {
        assert_eq!(Key::new(""), Err(KeyError::Empty));
        assert_eq!(
            Key::new("a".repeat(201)),
            Err(KeyError::TooLong { len: 201 })
        );
        assert_eq!(
            Key::new("ab\ncd"),
            Err(KeyError::ControlCharacter { position: 2 })
        );
        assert_eq!(None::<String>.to_key(), Err(KeyError::Missing));
    }

    #[test]
    fn renders_field_types_stably() {
        let id = uuid::Uuid::from_u128(0x1234);
        assert_eq!(
            id.to_key().map(|k| k.to_string()),
            Ok("00000000-0000-0000-0000-000000001234".into())
        );
        assert_eq!((-42i64).to_key().map(|k| k.to_string()), Ok("-42".into()));
        assert_eq!("p-1".to_key().map(|k| k.to_string()), Ok("p-1".into()));
    }
}
