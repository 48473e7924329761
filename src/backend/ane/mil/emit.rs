//! MIL text in the form the ANE compiler reads: a `program(VERSION)` header with build info,
//! then `func main<OPSET>(inputs) { statements } -> (outputs);`. Each statement is
//! `TYPE name = op(arg = value, ...)[name = string("name")];` with arguments in alphabetical
//! order, constants as `const()` with a `val`. The ios16 form spells every scalar as a rank-0
//! tensor (`tensor<string, []>("x")`), the ios18 form as a scalar (`string("x")`).

use std::fmt::Write;

use super::{Arg, DType, Literal, OpKind, Program, Target, TensorType};

/// The build info the original system's programs carried (compiler component versions).
const BUILD_INFO: [(&str, &str); 4] = [
    ("coremlc-component-MIL", "3510.2.1"),
    ("coremlc-version", "3505.4.1"),
    ("coremltools-component-milinternal", ""),
    ("coremltools-version", "9.0"),
];

/// A float as a C99 hexadecimal literal (`0x1.8p+1`), exact for every finite f32.
pub fn hex_float(v: f32) -> String {
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0x0p+0"
        } else {
            "0x0p+0"
        }
        .into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let bits = v.to_bits();
    let sign = if bits >> 31 == 1 { "-" } else { "" };
    let mut exp = ((bits >> 23) & 0xff) as i32;
    let mut mant = bits & 0x7f_ffff;
    if exp == 0 {
        // Subnormal: normalise.
        exp = 1;
        while mant & 0x80_0000 == 0 {
            mant <<= 1;
            exp -= 1;
        }
        mant &= 0x7f_ffff;
    }
    let e = exp - 127;
    // 23 mantissa bits as 6 hex digits (shifted left by one), trailing zeros dropped.
    let digits = format!("{:06x}", mant << 1);
    let digits = digits.trim_end_matches('0');
    if digits.is_empty() {
        format!("{sign}0x1p{e:+}")
    } else {
        format!("{sign}0x1.{digits}p{e:+}")
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// How scalars of a target are written.
struct Style(Target);

impl Style {
    /// A typed scalar: `string("x")` or `tensor<string, []>("x")`.
    fn scalar(&self, dtype: DType, value: &str) -> String {
        match self.0 {
            Target::Ios18 => format!("{}({value})", dtype.name()),
            Target::Ios16 => format!("{}({value})", TensorType::scalar(dtype)),
        }
    }

    /// A value's declared type.
    fn ty(&self, t: &TensorType) -> String {
        match (self.0, t.rank()) {
            (Target::Ios18, 0) => t.dtype.name().to_string(),
            _ => t.to_string(),
        }
    }

    fn literal_items(&self, t: &TensorType, lit: &Literal) -> Vec<String> {
        match lit {
            Literal::Ints(v) => v.iter().map(|x| x.to_string()).collect(),
            Literal::Floats(v) => v.iter().map(|&x| hex_float(x)).collect(),
            Literal::Bools(v) => v.iter().map(|x| x.to_string()).collect(),
            Literal::Str(s) => vec![quote(s)],
            Literal::Blob { path, offset } => vec![format!(
                "BLOBFILE(path = {}, offset = {})",
                self.scalar(DType::Str, &quote(path)),
                self.scalar(DType::Uint64, &offset.to_string())
            )],
        }
        .into_iter()
        .take(if t.rank() == 0 { 1 } else { usize::MAX })
        .collect()
    }

    /// A constant's `val`.
    fn value(&self, t: &TensorType, lit: &Literal) -> String {
        let items = self.literal_items(t, lit);
        if let Literal::Blob { .. } = lit {
            return format!("{t}({})", items.join(", "));
        }
        if t.rank() == 0 {
            return self.scalar(t.dtype, items.first().map_or("", |s| s.as_str()));
        }
        format!("{t}([{}])", items.join(", "))
    }
}

/// The MIL text of a program.
pub fn emit(p: &Program) -> String {
    let st = Style(p.target);
    let mut s = String::new();
    let _ = writeln!(s, "program({})", p.target.program_version());
    let pair_type = st.ty(&TensorType::scalar(DType::Str));
    let info: Vec<String> = BUILD_INFO
        .iter()
        .map(|(k, v)| format!("{{{}, {}}}", quote(k), quote(v)))
        .collect();
    let _ = writeln!(
        s,
        "[buildInfo = dict<{pair_type}, {pair_type}>({{{}}})]",
        info.join(", ")
    );
    let _ = writeln!(s, "{{");
    let inputs: Vec<String> = p
        .inputs
        .iter()
        .map(|(n, t)| format!("{} {n}", st.ty(t)))
        .collect();
    let _ = writeln!(
        s,
        "    func main<{}>({}) {{",
        p.target.opset(),
        inputs.join(", ")
    );
    for op in &p.ops {
        let name = st.scalar(DType::Str, &quote(&op.name));
        let body = match &op.kind {
            OpKind::Const(lit) => {
                format!("const()[name = {name}, val = {}]", st.value(&op.ty, lit))
            }
            OpKind::Call { op: kind, args } => {
                let mut sorted: Vec<&(String, Arg)> = args.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(&b.0));
                let list: Vec<String> = sorted
                    .iter()
                    .map(|(n, a)| match a {
                        Arg::Var(v) => format!("{n} = {v}"),
                        Arg::Tuple(vs) => format!("{n} = ({})", vs.join(", ")),
                    })
                    .collect();
                format!("{kind}({})[name = {name}]", list.join(", "))
            }
        };
        let _ = writeln!(s, "            {} {} = {body};", st.ty(&op.ty), op.name);
    }
    let _ = writeln!(s, "    }} -> ({});", p.outputs.join(", "));
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
mod tests {
    use super::hex_float;

    #[test]
    fn hex_floats_are_exact() {
        for (v, s) in [
            (1.0, "0x1p+0"),
            (0.125, "0x1p-3"),
            (3.0, "0x1.8p+1"),
            (-65504.0, "-0x1.ffcp+15"),
            (0.0, "0x0p+0"),
        ] {
            assert_eq!(hex_float(v), s);
        }
        for v in [0.1f32, -7.25, 6.1e-5, 1234.5678, 1e-40, f32::MAX] {
            let h = hex_float(v);
            assert_eq!(super::super::parse::parse_hex_float(&h), Some(v), "{h}");
        }
    }
}
