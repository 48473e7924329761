//! A parser of the MIL text handgrad emits (and of MIL text in the same forms generally): both
//! program forms, constants with inline or BLOBFILE values, ops with named and tuple
//! arguments, several inputs and outputs. Every malformed input is an error with its line and
//! column, never a panic; nothing is allocated from sizes written in the text.

use super::{Arg, DType, Literal, Op, OpKind, Program, Target, TensorType};

/// Most statements, dimensions per shape and elements per inline literal accepted.
const MAX_OPS: usize = 100_000;
const MAX_RANK: usize = 8;
const MAX_INLINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Num(String),
    Str(String),
    Punct(char),
    Arrow,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
    col: usize,
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut col) = (0, 1, 1);
    while i < chars.len() {
        let c = chars[i];
        let (l, cl) = (line, col);
        let advance = |i: &mut usize, col: &mut usize, n: usize| {
            *i += n;
            *col += n;
        };
        if c == '\n' {
            i += 1;
            line += 1;
            col = 1;
            continue;
        }
        if c.is_whitespace() {
            advance(&mut i, &mut col, 1);
            continue;
        }
        if c == '/' && chars.get(i + 1) == Some(&'/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '-' && chars.get(i + 1) == Some(&'>') {
            out.push(Token {
                tok: Tok::Arrow,
                line: l,
                col: cl,
            });
            advance(&mut i, &mut col, 2);
            continue;
        }
        if c == '"' {
            let mut s = String::new();
            let mut j = i + 1;
            loop {
                match chars.get(j) {
                    None | Some('\n') => {
                        return Err(format!("line {l}:{cl}: unterminated string"));
                    }
                    Some('"') => break,
                    Some('\\') => {
                        match chars.get(j + 1) {
                            Some(&e) => s.push(e),
                            None => return Err(format!("line {l}:{cl}: unterminated string")),
                        }
                        j += 2;
                    }
                    Some(&ch) => {
                        s.push(ch);
                        j += 1;
                    }
                }
            }
            out.push(Token {
                tok: Tok::Str(s),
                line: l,
                col: cl,
            });
            let n = j + 1 - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        let starts_num = c.is_ascii_digit()
            || ((c == '-' || c == '+' || c == '.')
                && chars
                    .get(i + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == '.'));
        if starts_num {
            let mut j = i + 1;
            let hex = chars[i..].iter().take(4).collect::<String>().contains("0x");
            while j < chars.len() {
                let d = chars[j];
                let prev = chars[j - 1];
                // A sign continues a number only as an exponent's sign.
                let exp_sign = (d == '-' || d == '+')
                    && (matches!(prev, 'p' | 'P') || !hex && matches!(prev, 'e' | 'E'));
                if d.is_ascii_alphanumeric() || d == '.' || exp_sign {
                    j += 1;
                } else {
                    break;
                }
            }
            out.push(Token {
                tok: Tok::Num(chars[i..j].iter().collect()),
                line: l,
                col: cl,
            });
            let n = j - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let mut j = i + 1;
            while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            out.push(Token {
                tok: Tok::Ident(chars[i..j].iter().collect()),
                line: l,
                col: cl,
            });
            let n = j - i;
            advance(&mut i, &mut col, n);
            continue;
        }
        if "()[]{}<>,=;".contains(c) {
            out.push(Token {
                tok: Tok::Punct(c),
                line: l,
                col: cl,
            });
            advance(&mut i, &mut col, 1);
            continue;
        }
        return Err(format!("line {l}:{cl}: unexpected character '{c}'"));
    }
    Ok(out)
}

/// Parses a C99 hexadecimal float (`0x1.8p+1`, `-0x0p+0`).
pub fn parse_hex_float(s: &str) -> Option<f32> {
    let (neg, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let rest = rest
        .strip_prefix("0x")
        .or_else(|| rest.strip_prefix("0X"))?;
    let (mant, exp) = rest.split_once(['p', 'P'])?;
    let exp: i32 = exp.parse().ok()?;
    let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut v = 0f64;
    for c in int.chars() {
        v = v * 16.0 + c.to_digit(16)? as f64;
    }
    let mut scale = 1.0 / 16.0;
    for c in frac.chars() {
        v += c.to_digit(16)? as f64 * scale;
        scale /= 16.0;
    }
    let v = v * 2f64.powi(exp);
    Some(if neg { -v } else { v } as f32)
}

fn parse_number(s: &str) -> Option<f64> {
    if s.contains("0x") || s.contains("0X") {
        return parse_hex_float(s).map(|v| v as f64);
    }
    s.parse::<f64>().ok()
}

struct Parser {
    toks: Vec<Token>,
    pos: usize,
}

type R<T> = Result<T, String>;

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.tok)
    }

    fn here(&self) -> String {
        match self.toks.get(self.pos).or(self.toks.last()) {
            Some(t) => format!("line {}:{}", t.line, t.col),
            None => "line 1:1".into(),
        }
    }

    fn line(&self) -> usize {
        self.toks.get(self.pos).map_or(0, |t| t.line)
    }

    fn fail<T>(&self, what: &str) -> R<T> {
        let found = match self.peek() {
            Some(Tok::Ident(s)) => format!("'{s}'"),
            Some(Tok::Num(s)) => format!("number {s}"),
            Some(Tok::Str(s)) => format!("string \"{s}\""),
            Some(Tok::Punct(c)) => format!("'{c}'"),
            Some(Tok::Arrow) => "'->'".into(),
            None => "the end of the text".into(),
        };
        Err(format!("{}: expected {what}, found {found}", self.here()))
    }

    fn punct(&mut self, c: char) -> R<()> {
        if self.peek() == Some(&Tok::Punct(c)) {
            self.pos += 1;
            Ok(())
        } else {
            self.fail(&format!("'{c}'"))
        }
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek() == Some(&Tok::Punct(c))
    }

    fn ident(&mut self) -> R<String> {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => self.fail("a name"),
        }
    }

    fn keyword(&mut self, k: &str) -> R<()> {
        match self.peek() {
            Some(Tok::Ident(s)) if s == k => {
                self.pos += 1;
                Ok(())
            }
            _ => self.fail(&format!("'{k}'")),
        }
    }

    fn number(&mut self) -> R<String> {
        match self.peek() {
            Some(Tok::Num(s)) => {
                let s = s.clone();
                self.pos += 1;
                Ok(s)
            }
            _ => self.fail("a number"),
        }
    }

    /// Skips a balanced `[...]` (the build info).
    fn skip_brackets(&mut self) -> R<()> {
        let start = self.here();
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return Err(format!("{start}: unbalanced '[' in the program header")),
                Some(Tok::Punct('[')) | Some(Tok::Punct('(')) | Some(Tok::Punct('{')) => depth += 1,
                Some(Tok::Punct(']')) | Some(Tok::Punct(')')) | Some(Tok::Punct('}')) => {
                    depth = depth
                        .checked_sub(1)
                        .ok_or_else(|| format!("{}: unbalanced brackets", self.here()))?;
                    if depth == 0 {
                        self.pos += 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.pos += 1;
        }
    }

    /// `tensor<dtype, [d, ...]>` or a scalar dtype name.
    fn ty(&mut self) -> R<TensorType> {
        let name = self.ident()?;
        if name != "tensor" {
            return DType::from_name(&name)
                .map(TensorType::scalar)
                .ok_or_else(|| format!("{}: unknown type '{name}'", self.here()));
        }
        self.punct('<')?;
        let d = self.ident()?;
        let dtype = DType::from_name(&d)
            .ok_or_else(|| format!("{}: unknown element type '{d}'", self.here()))?;
        self.punct(',')?;
        self.punct('[')?;
        let mut shape = Vec::new();
        while !self.is_punct(']') {
            let n = self.number()?;
            let d: usize = n.parse().map_err(|_| {
                format!(
                    "{}: dimension '{n}' is not a non-negative integer",
                    self.here()
                )
            })?;
            shape.push(d);
            if shape.len() > MAX_RANK {
                return Err(format!("{}: more than {MAX_RANK} dimensions", self.here()));
            }
            if !self.is_punct(']') {
                self.punct(',')?;
            }
        }
        self.punct(']')?;
        self.punct('>')?;
        let mut total: usize = 1;
        for &d in &shape {
            total = total
                .checked_mul(d)
                .filter(|&t| t <= 1 << 40)
                .ok_or_else(|| format!("{}: shape {shape:?} is too large", self.here()))?;
        }
        Ok(TensorType { dtype, shape })
    }

    /// A string value: `string("x")` or `tensor<string, []>("x")`.
    fn string_value(&mut self) -> R<String> {
        let t = self.ty()?;
        if t.dtype != DType::Str || t.rank() != 0 {
            return Err(format!("{}: expected a string, got {t}", self.here()));
        }
        self.punct('(')?;
        let s = match self.peek() {
            Some(Tok::Str(s)) => s.clone(),
            _ => return self.fail("a string literal"),
        };
        self.pos += 1;
        self.punct(')')?;
        Ok(s)
    }

    fn scalar_item(
        &mut self,
        dtype: DType,
        ints: &mut Vec<i64>,
        floats: &mut Vec<f32>,
        bools: &mut Vec<bool>,
    ) -> R<()> {
        let here = self.here();
        match dtype {
            DType::Bool => match self.ident()?.as_str() {
                "true" => bools.push(true),
                "false" => bools.push(false),
                other => return Err(format!("{here}: '{other}' is not a bool")),
            },
            DType::Int32 | DType::Int8 | DType::Uint64 => {
                let n = self.number()?;
                let v: i64 = n
                    .parse()
                    .map_err(|_| format!("{here}: '{n}' is not an integer"))?;
                if dtype == DType::Int32 && i32::try_from(v).is_err()
                    || dtype == DType::Int8 && i8::try_from(v).is_err()
                    || dtype == DType::Uint64 && v < 0
                {
                    return Err(format!("{here}: {v} does not fit {}", dtype.name()));
                }
                ints.push(v);
            }
            DType::Fp16 | DType::Fp32 => {
                let n = match self.peek() {
                    Some(Tok::Ident(s)) if s == "inf" || s == "nan" => {
                        let s = s.clone();
                        self.pos += 1;
                        s
                    }
                    _ => self.number()?,
                };
                let v = match n.as_str() {
                    "inf" => f64::INFINITY,
                    "nan" => f64::NAN,
                    _ => {
                        parse_number(&n).ok_or_else(|| format!("{here}: '{n}' is not a number"))?
                    }
                };
                let v = v as f32;
                floats.push(if dtype == DType::Fp16 {
                    half::f16::from_f32(v).to_f32()
                } else {
                    v
                });
            }
            DType::Str => return Err(format!("{here}: string tensors are not supported")),
        }
        Ok(())
    }

    /// A constant's value of declared type `want`.
    fn literal(&mut self, want: &TensorType) -> R<Literal> {
        let at = self.here();
        let t = self.ty()?;
        if t != *want {
            return Err(format!(
                "{at}: the value's type {t} differs from the declared {want}"
            ));
        }
        self.punct('(')?;
        if let Some(Tok::Ident(s)) = self.peek()
            && s == "BLOBFILE"
        {
            self.pos += 1;
            self.punct('(')?;
            self.keyword("path")?;
            self.punct('=')?;
            let path = self.string_value()?;
            self.punct(',')?;
            self.keyword("offset")?;
            self.punct('=')?;
            let ot = self.ty()?;
            if ot.dtype != DType::Uint64 || ot.rank() != 0 {
                return Err(format!("{}: BLOBFILE offset must be uint64", self.here()));
            }
            self.punct('(')?;
            let n = self.number()?;
            let offset: u64 = n
                .parse()
                .map_err(|_| format!("{}: offset '{n}' is not a uint64", self.here()))?;
            self.punct(')')?;
            self.punct(')')?;
            self.punct(')')?;
            if !t.dtype.is_float() && t.dtype != DType::Int8 {
                return Err(format!(
                    "{at}: BLOBFILE constants must be fp16, fp32 or int8"
                ));
            }
            return Ok(Literal::Blob { path, offset });
        }
        if t.dtype == DType::Str {
            let s = match self.peek() {
                Some(Tok::Str(s)) => s.clone(),
                _ => return self.fail("a string literal"),
            };
            self.pos += 1;
            self.punct(')')?;
            return Ok(Literal::Str(s));
        }
        let (mut ints, mut floats, mut bools) = (Vec::new(), Vec::new(), Vec::new());
        if t.rank() == 0 {
            self.scalar_item(t.dtype, &mut ints, &mut floats, &mut bools)?;
        } else {
            self.punct('[')?;
            while !self.is_punct(']') {
                self.scalar_item(t.dtype, &mut ints, &mut floats, &mut bools)?;
                if ints.len() + floats.len() + bools.len() > MAX_INLINE {
                    return Err(format!("{at}: inline constant too large (use a BLOBFILE)"));
                }
                if !self.is_punct(']') {
                    self.punct(',')?;
                }
            }
            self.punct(']')?;
        }
        self.punct(')')?;
        let count = ints.len() + floats.len() + bools.len();
        if count != t.elements() {
            return Err(format!(
                "{at}: {t} needs {} values, {count} given",
                t.elements()
            ));
        }
        Ok(match t.dtype {
            DType::Bool => Literal::Bools(bools),
            DType::Fp16 | DType::Fp32 => Literal::Floats(floats),
            _ => Literal::Ints(ints),
        })
    }

    fn statement(&mut self) -> R<Op> {
        let line = self.line();
        let ty = self.ty()?;
        let name = self.ident()?;
        self.punct('=')?;
        let op = self.ident()?;
        self.punct('(')?;
        let mut args = Vec::new();
        while !self.is_punct(')') {
            let an = self.ident()?;
            self.punct('=')?;
            let arg = if self.is_punct('(') {
                self.pos += 1;
                let mut vs = Vec::new();
                while !self.is_punct(')') {
                    vs.push(self.ident()?);
                    if !self.is_punct(')') {
                        self.punct(',')?;
                    }
                }
                self.punct(')')?;
                Arg::Tuple(vs)
            } else {
                Arg::Var(self.ident()?)
            };
            args.push((an, arg));
            if !self.is_punct(')') {
                self.punct(',')?;
            }
        }
        self.punct(')')?;
        self.punct('[')?;
        let mut val = None;
        while !self.is_punct(']') {
            let attr = self.ident()?;
            self.punct('=')?;
            match attr.as_str() {
                "name" => {
                    self.string_value()?;
                }
                "val" => val = Some(self.literal(&ty)?),
                other => return Err(format!("{}: unknown attribute '{other}'", self.here())),
            }
            if !self.is_punct(']') {
                self.punct(',')?;
            }
        }
        self.punct(']')?;
        self.punct(';')?;
        let kind = if op == "const" {
            if !args.is_empty() {
                return Err(format!("line {line}: const takes no arguments"));
            }
            OpKind::Const(val.ok_or_else(|| format!("line {line}: const '{name}' has no val"))?)
        } else {
            if val.is_some() {
                return Err(format!("line {line}: only const takes a val"));
            }
            OpKind::Call { op, args }
        };
        Ok(Op {
            name,
            ty,
            kind,
            line,
        })
    }

    fn program(&mut self) -> R<Program> {
        self.keyword("program")?;
        self.punct('(')?;
        let version = self.number()?;
        self.punct(')')?;
        if self.is_punct('[') {
            self.skip_brackets()?;
        }
        self.punct('{')?;
        self.keyword("func")?;
        let fname = self.ident()?;
        if fname != "main" {
            return Err(format!(
                "{}: the function must be 'main', not '{fname}'",
                self.here()
            ));
        }
        self.punct('<')?;
        let opset = self.ident()?;
        let target = Target::from_opset(&opset).ok_or_else(|| {
            format!(
                "{}: unsupported opset '{opset}' (ios16 or ios18)",
                self.here()
            )
        })?;
        if version != target.program_version() {
            return Err(format!(
                "program({version}) does not go with main<{opset}> (expected program({}))",
                target.program_version()
            ));
        }
        self.punct('>')?;
        self.punct('(')?;
        let mut inputs = Vec::new();
        while !self.is_punct(')') {
            let t = self.ty()?;
            inputs.push((self.ident()?, t));
            if !self.is_punct(')') {
                self.punct(',')?;
            }
        }
        self.punct(')')?;
        self.punct('{')?;
        let mut ops = Vec::new();
        while !self.is_punct('}') {
            if self.peek().is_none() {
                return self.fail("'}' closing the function");
            }
            ops.push(self.statement()?);
            if ops.len() > MAX_OPS {
                return Err(format!("more than {MAX_OPS} statements"));
            }
        }
        self.punct('}')?;
        match self.peek() {
            Some(Tok::Arrow) => self.pos += 1,
            _ => return self.fail("'->' and the outputs"),
        }
        self.punct('(')?;
        let mut outputs = Vec::new();
        while !self.is_punct(')') {
            outputs.push(self.ident()?);
            if !self.is_punct(')') {
                self.punct(',')?;
            }
        }
        self.punct(')')?;
        self.punct(';')?;
        self.punct('}')?;
        if self.peek().is_some() {
            return self.fail("the end of the program");
        }
        if outputs.is_empty() {
            return Err("the function has no outputs".into());
        }
        Ok(Program {
            target,
            inputs,
            ops,
            outputs,
        })
    }
}

/// Parses MIL text. Checks the syntax and that constants match their declared types; the
/// types of ops are checked by `sim::check`.
pub fn parse(text: &str) -> Result<Program, String> {
    let toks = lex(text)?;
    Parser { toks, pos: 0 }.program()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_decimal_numbers() {
        assert_eq!(parse_hex_float("0x1.8p+1"), Some(3.0));
        assert_eq!(parse_hex_float("-0x1p-3"), Some(-0.125));
        assert_eq!(parse_number("-65504.0"), Some(-65504.0));
        assert_eq!(parse_hex_float("0xp+1"), None);
    }
}
