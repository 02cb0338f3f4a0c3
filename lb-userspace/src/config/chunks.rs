//! A large config read a piece at a time. A document tree of the whole file takes about 3 KB
//! per service (860 MB for 250,000 services, measured), far more than the checked config, so
//! the file is cut at its `[[service]]` headers and each piece is parsed, checked and dropped
//! before the next. Cutting there changes nothing: everything after such a header up to the
//! next belongs to that one service, or is a top-level table, which a piece parses the same.
//!
//! This is only the fast path. Whatever it cannot vouch for (a piece that does not parse, a
//! top-level key in two pieces, any problem at all) makes the caller parse and check the
//! whole file as one document, so errors and their positions are always the whole file's.

use toml::{Table, Value};

/// The text cut before each line that is a `[[service]]` header. A line that only looks like
/// one, inside a multi-line string, is cut too, but then the piece before it ends inside an
/// open string and does not parse, which sends the caller to the whole-file path.
pub fn pieces(text: &str) -> Vec<&str> {
    let mut cuts = vec![0];
    let mut offset = 0;
    let mut in_multiline = false;
    for line in text.split_inclusive('\n') {
        if !in_multiline && is_service_header(line) && offset > 0 {
            cuts.push(offset);
        }
        // An odd number of delimiters opens or closes a multi-line string.
        let delimiters = line.matches("\"\"\"").count() + line.matches("'''").count();
        if delimiters % 2 == 1 {
            in_multiline = !in_multiline;
        }
        offset += line.len();
    }
    cuts.push(text.len());
    cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

fn is_service_header(line: &str) -> bool {
    let line = line.split('#').next().unwrap_or("").trim();
    let Some(inner) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) else {
        return false;
    };
    inner.trim() == "service"
}

/// What the pieces hold: the top-level keys other than `service`, and the services in order,
/// handed to `each_service` as they are parsed. `None` when the pieces do not add up to what
/// the whole file would be (see the module doc): the caller then parses the whole file.
pub fn parse(text: &str, mut each_service: impl FnMut(usize, &Value)) -> Option<Table> {
    let mut rest = Table::new();
    let mut index = 0;
    for (n, piece) in pieces(text).into_iter().enumerate() {
        let mut root: Table = toml::from_str(piece).ok()?;
        match root.remove("service") {
            // `service = [...]` written inline in the first piece cannot be continued by
            // `[[service]]` headers after it; the whole file says so.
            Some(_)
                if n == 0 && !piece.lines().any(is_service_header) && text.len() > piece.len() =>
            {
                return None
            }
            Some(Value::Array(services)) => {
                for service in &services {
                    each_service(index, service);
                    index += 1;
                }
            }
            Some(_) => return None,
            None => {}
        }
        for (key, value) in root {
            if rest.insert(key, value).is_some() {
                return None;
            }
        }
    }
    Some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "[dataplane]\ncount_bytes = false\n\n\
                        [[service]]\nname = \"a\"\n[service.health]\nkind = \"tcp\"\n\
                        [[ service ]] # the second\nname = \"b\"\n";

    #[test]
    fn cuts_before_each_service_header_only() {
        let p = pieces(FILE);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[1].starts_with("[[service]]") && p[1].contains("[service.health]"));
        assert!(p[2].starts_with("[[ service ]]"));
        assert_eq!(p.concat(), FILE);
    }

    #[test]
    fn the_pieces_hold_what_the_whole_file_holds() {
        let mut names = Vec::new();
        let rest = parse(FILE, |i, s| {
            names.push((i, s["name"].as_str().unwrap().to_owned()))
        })
        .expect("parses in pieces");
        assert_eq!(names, [(0, "a".to_owned()), (1, "b".to_owned())]);
        assert_eq!(rest["dataplane"]["count_bytes"].as_bool(), Some(false));
        let whole: Table = toml::from_str(FILE).unwrap();
        assert_eq!(
            whole["service"][0]["health"],
            toml::from_str::<Table>("[health]\nkind = \"tcp\"\n").unwrap()["health"]
        );
    }

    #[test]
    fn a_header_inside_a_multi_line_string_is_no_cut() {
        let text = "[[service]]\nname = \"\"\"\n[[service]]\n\"\"\"\n";
        assert_eq!(pieces(text).len(), 1);
        let mut names = Vec::new();
        parse(text, |_, s| {
            names.push(s["name"].as_str().unwrap().to_owned())
        })
        .unwrap();
        assert_eq!(names, ["[[service]]\n"]);
    }

    #[test]
    fn what_the_pieces_cannot_vouch_for_goes_to_the_whole_file() {
        let twice = "[dataplane]\ncount_bytes = true\n[[service]]\nname = \"a\"\n[dataplane]\n";
        assert!(parse(twice, |_, _| {}).is_none());
        let inline_then_header = "service = [{ name = \"a\" }]\n[[service]]\nname = \"b\"\n";
        assert!(parse(inline_then_header, |_, _| {}).is_none());
        assert!(parse("[[service]]\nname = \n", |_, _| {}).is_none());
    }
}
