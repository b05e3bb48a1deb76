//! Metric values in JSON, NaN and infinities included.
//!
//! JSON has no NaN or infinity: serde_json writes them as `null`, which then
//! does not read back as a number. But a diverged run's NaN loss is a fact
//! worth keeping and drawing, and MLflow clients send them. So non-finite
//! values travel as the strings `"NaN"`, `"Infinity"` and `"-Infinity"`, as
//! protobuf's JSON mapping (and so MLflow) writes them; finite values stay
//! plain numbers, so everything recorded before reads the same.
//!
//! Use `#[serde(with = "crate::number::value")]` on an `f64`, or [`Number`]
//! inside collections.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An `f64` that keeps NaN and infinities through JSON.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Number(pub f64);

impl Serialize for Number {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_nan() {
            s.serialize_str("NaN")
        } else if v == f64::INFINITY {
            s.serialize_str("Infinity")
        } else if v == f64::NEG_INFINITY {
            s.serialize_str("-Infinity")
        } else {
            s.serialize_f64(v)
        }
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not an untagged enum: metric batches are the hot path,
        // and an untagged enum buffers every value first.
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number, \"NaN\", \"Infinity\" or \"-Infinity\"")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Number, E> {
                Ok(Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Number, E> {
                Ok(Number(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Number, E> {
                parse(name).map(Number).ok_or_else(|| {
                    E::custom(format!(
                        "expected a number, \"NaN\", \"Infinity\" or \"-Infinity\", not {name:?}"
                    ))
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The names non-finite values go by (MLflow's clients also send `"nan"`
/// and `"inf"` spelled by Python).
fn parse(name: &str) -> Option<f64> {
    match name {
        "NaN" | "nan" => Some(f64::NAN),
        "Infinity" | "inf" | "+Infinity" => Some(f64::INFINITY),
        "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// `#[serde(with = "crate::number::value")]` for a plain `f64` field.
pub mod value {
    use super::*;
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        Number(*v).serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Number::deserialize(d).map(|n| n.0)
    }
}

/// `with` for a metric name -> (step, value) map (a job's last values).
pub mod last_values {
    use super::*;
    use std::collections::BTreeMap;
    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, (u64, f64)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, &(step, v))| (k, (step, Number(v)))))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, (u64, f64)>, D::Error> {
        let m = BTreeMap::<String, (u64, Number)>::deserialize(d)?;
        Ok(m.into_iter()
            .map(|(k, (step, v))| (k, (step, v.0)))
            .collect())
    }
}

/// `with` for a metric name -> [(step, value)] map (series).
pub mod series {
    use super::*;
    use std::collections::BTreeMap;
    pub fn serialize<S: Serializer>(
        m: &BTreeMap<String, Vec<(u64, f64)>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, points)| {
            let points: Vec<(u64, Number)> = points.iter().map(|&(t, v)| (t, Number(v))).collect();
            (k, points)
        }))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Vec<(u64, f64)>>, D::Error> {
        let m = BTreeMap::<String, Vec<(u64, Number)>>::deserialize(d)?;
        Ok(m.into_iter()
            .map(|(k, p)| (k, p.into_iter().map(|(t, v)| (t, v.0)).collect()))
            .collect())
    }
}

/// `with` for sorted (name, value) pairs (a history row's metrics).
pub mod named_values {
    use super::*;
    use std::sync::Arc;
    pub fn serialize<S: Serializer>(p: &[(Arc<str>, f64)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(p.iter().map(|(k, v)| (k, Number(*v))))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Box<[(Arc<str>, f64)]>, D::Error> {
        let p = Vec::<(Arc<str>, Number)>::deserialize(d)?;
        Ok(p.into_iter().map(|(k, v)| (k, v.0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_round_trip_and_finite_ones_stay_numbers() {
        for v in [1.5, -0.0, 1e-300, f64::INFINITY, f64::NEG_INFINITY] {
            let text = serde_json::to_string(&Number(v)).unwrap();
            let back: Number = serde_json::from_str(&text).unwrap();
            assert_eq!(back.0.to_bits(), v.to_bits(), "{text}");
        }
        assert_eq!(serde_json::to_string(&Number(2.0)).unwrap(), "2.0");
        assert_eq!(serde_json::to_string(&Number(f64::NAN)).unwrap(), "\"NaN\"");
        let nan: Number = serde_json::from_str("\"NaN\"").unwrap();
        assert!(nan.0.is_nan());
        let err = serde_json::from_str::<Number>("\"lots\"").unwrap_err();
        assert!(err.to_string().contains("not \"lots\""), "{err}");
        assert!(serde_json::from_str::<Number>("null").is_err());
    }
}
